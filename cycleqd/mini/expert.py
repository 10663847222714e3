"""An extra mini expert (a skill outside the default world), trained from the world's base on first use.

    ensure_extra_expert(".cache/mini", "regex")   # -> .cache/mini/expert_regex

The expert is fine-tuned from the built base with the world's own expert recipe
and trainer, exactly as the default experts are; only its skill is new. It lives
in its own folder next to the others, and the default world (base, three experts,
manifest.json) is never touched: ``make evolve`` stays a three-skill run. A
``build.json`` in the folder records the seed, size, recipe and base it was
trained from; a folder whose record matches is reused.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cycleqd.mini.build import SIZES, _save, _seeded, build_mini_world, expert_data, recipe_hash
from cycleqd.mini.skills import EXTRA_SKILLS, SKILLS

BUILD_RECORD = "build.json"


def _record(world: Path, skill: str, seed: int, size: str) -> dict:
    from cycleqd.model.experts import model_fingerprint

    return {
        "skill": skill,
        "seed": seed,
        "size": size,
        "recipe": recipe_hash(SIZES[size]),
        "items_version": getattr(EXTRA_SKILLS[skill], "ITEMS_VERSION", 1),
        "base": model_fingerprint(str(world / "base")),
    }


def extra_expert_dir(world: str | Path, skill: str) -> Path:
    """Folder of ``skill``'s expert inside the mini world ``world``."""
    return Path(world) / f"expert_{skill}"


def ensure_extra_expert(
    world: str | Path, skill: str, *, seed: int = 0, size: str = "default", progress: bool = True, threads: int = 1
) -> Path:
    """Train (or reuse) the expert of an extra mini skill in ``world/expert_<skill>``; returns the folder.

    The world itself is built first if it is missing (:func:`cycleqd.mini.build.build_mini_world`).
    Training is written into a temporary sibling folder and renamed into place, so a killed
    build leaves no half expert. Raises ValueError for a skill that is not an extra skill.
    """
    if skill not in EXTRA_SKILLS:
        known = ", ".join(EXTRA_SKILLS)
        raise ValueError(f"{skill!r} is not an extra mini skill (known: {known}; default skills: {', '.join(SKILLS)})")
    world = Path(world)
    build_mini_world(world, seed=seed, size=size, progress=progress)
    out = extra_expert_dir(world, skill)
    want = _record(world, skill, seed, size)
    try:
        have = json.loads((out / BUILD_RECORD).read_text())
        if {k: have.get(k) for k in want} == want and (out / "config.json").is_file():
            return out
    except (OSError, ValueError):
        pass
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cycleqd.mini.train import train

    recipe = SIZES[size]
    # The skill's position after the default ones seeds its training, as the default experts' do.
    k = len(SKILLS) + list(EXTRA_SKILLS).index(skill)
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))  # fixed threads: same model
    tmp = world / f".expert_{skill}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(world / "base")
        model = LlamaForCausalLM.from_pretrained(world / "base", dtype=torch.float32)
        spec = _seeded(recipe.expert, seed + 1 + k)
        if progress:
            print(f"training the mini expert {skill} into {out}", flush=True)
        losses = train(model, tok, expert_data(skill, recipe, seed), spec, desc=f"expert_{skill}", progress=progress)
        _save(model, tok, tmp)
        record = {**want, "train": asdict(spec), "seconds": round(time.perf_counter() - t0, 2),
                  "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4)}
        (tmp / BUILD_RECORD).write_text(json.dumps(record, indent=2))
        if out.exists():
            shutil.rmtree(out)  # a stale expert of another recipe or base
        os.replace(tmp, out)
    finally:
        torch.set_num_threads(before)
        shutil.rmtree(tmp, ignore_errors=True)
    return out
