"""The loop closed in the mini world: a fresh expert fine-tuned on an evolved population's trajectories.

    cycleqd trajectories RUN --out traj.jsonl
    cycleqd mini finetune --trajectories traj.jsonl --skill code --out DIR

:func:`read_trajectories` reads the JSONL that ``cycleqd trajectories`` writes (ShareGPT
``conversations``; the mini tasks are single-turn: one human turn, the prompt, and one
gpt turn, the answer line). :func:`finetune` trains a new expert from the world's base
with the world's own expert recipe and trainer (:mod:`cycleqd.mini.train`), the
harvested items repeated to fill the recipe's steps, then scores it and the world's
original expert of that skill on the same test draw; ``finetune.json`` records both.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from cycleqd.config import ConfigError
from cycleqd.mini.items import MiniItem

__all__ = ["read_trajectories", "finetune"]


def read_trajectories(path: str | Path, skill: str) -> list[MiniItem]:
    """The items of mini skill ``skill`` in a trajectories JSONL (lines of other tasks are skipped).

    Raises:
        ConfigError: no such file, a line that is not a JSON object with ``conversations``, a
            mini line whose turns are not one human prompt and one gpt answer, or no line of ``skill``.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--trajectories {str(path)!r}: no such file (`cycleqd trajectories RUN --out FILE`)")
    items = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{p}:{n}: not a JSON line ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
            raise ConfigError(f"{p}:{n}: not a trajectory (needs a conversations list)")
        if row.get("kind") != f"mini_{skill}":
            continue
        turns = row["conversations"]
        if [t.get("from") for t in turns] != ["human", "gpt"] or not all(isinstance(t.get("value"), str)
                                                                         for t in turns):
            raise ConfigError(f"{p}:{n}: a mini trajectory is one human turn and one gpt turn")
        prompt, answer = turns[0]["value"], turns[1]["value"]
        if not prompt.endswith("\n") or "\n" in answer:
            raise ConfigError(f"{p}:{n}: a mini prompt ends with a newline and its answer is one line")
        items.append(MiniItem(str(row.get("id", n)), "trajectory", prompt, answer))
    if not items:
        raise ConfigError(f"{p}: no trajectories of mini skill {skill!r} (kind mini_{skill})")
    return items


def _stream(items: list[MiniItem], need: int, batch: int, seed: int) -> list[MiniItem]:
    """``need`` items: passes over ``items`` in fresh orders, batches of similar length."""
    from cycleqd.mini.build import _bucketed

    rng = random.Random(f"finetune:{seed}")
    out: list[MiniItem] = []
    while len(out) < need:
        part = list(items)
        rng.shuffle(part)
        out += part
    return _bucketed(out[:need], batch, rng)


def finetune(world: str | Path, trajectories: str | Path, skill: str, out: str | Path, *, steps: int | None = None,
             seed: int = 0, test_n: int = 300, progress: bool = True, threads: int = 1) -> dict:
    """Fine-tune a new ``skill`` expert from ``world``'s base on the trajectories; score it beside the original.

    Writes the model (a Hugging Face folder) and ``finetune.json`` to ``out``; returns that record.

    Raises:
        ConfigError: bad trajectories (see :func:`read_trajectories`), an unbuilt world, an
            unknown skill, or ``out`` not empty.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cycleqd.mini.build import SIZES, _save, _seeded, read_manifest, score_models
    from cycleqd.mini.skills import SKILLS
    from cycleqd.mini.train import train

    if skill not in SKILLS:
        raise ConfigError(f"--skill {skill!r}: one of {', '.join(SKILLS)}")
    world = Path(world)
    manifest = read_manifest(world)
    if manifest is None or not (world / "base" / "config.json").is_file():
        raise ConfigError(f"{world}: no built mini world (`cycleqd mini build --dir {world}`)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} exists and is not an empty folder")
    items = read_trajectories(trajectories, skill)
    recipe = SIZES[manifest.get("size", "default")]
    spec = _seeded(recipe.expert, seed)
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {steps}")
        spec = replace(spec, steps=steps)
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    try:
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(world / "base")
        model = LlamaForCausalLM.from_pretrained(world / "base", dtype=torch.float32)
        data = _stream(items, spec.steps * spec.batch_size, spec.batch_size, seed)
        losses = train(model, tok, data, spec, desc=f"finetune_{skill}", progress=progress)
        _save(model, tok, out)
        train_seconds = time.perf_counter() - t0
        scored = replace(recipe, eval_test_n=test_n, eval_val_n=0)  # the test draw of seed 0, as the build's
        models = {"finetuned": out, f"expert_{skill}": world / f"expert_{skill}", "base": world / "base"}
        scores, _ = score_models(models, scored, progress=progress)
    finally:
        torch.set_num_threads(before)
    test = scores["test"]
    record = {
        "skill": skill, "trajectories": str(Path(trajectories).resolve()), "items": len(items),
        "distinct_prompts": len({it.prompt for it in items}), "train": asdict(spec),
        "train_seconds": round(train_seconds, 1), "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "test": {"n": test_n, "seed": 0, "finetuned": test["finetuned"],
                 f"expert_{skill}": test[f"expert_{skill}"], "base": test["base"]},
        "original_expert_train_items": recipe.expert.steps * recipe.expert.batch_size,
    }
    (out / "finetune.json").write_text(json.dumps(record, indent=2))
    return record
