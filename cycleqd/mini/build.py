"""Build the mini world: a char-level tokenizer, a tiny Llama base and one expert per skill.

    build_mini_world(".cache/mini")   # -> .cache/mini/{base,expert_code,expert_sql,expert_shell}, manifest.json

The base is trained on a mixture of the three skills' train splits in which a
few "common" families per skill are frequent and the rest are rare, so it knows
every format but solves only part of each skill. Each expert is fine-tuned from
the base on all families of its own skill, with a small learning rate so that its
task vector stays small (merges of large task vectors collapse). Everything is
deterministic in the seed and cached: a folder whose manifest matches is reused.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from cycleqd.mini.items import MiniItem
from cycleqd.mini.skills import SKILLS, skill_items
from cycleqd.mini.train import ModelShape, TrainSpec, new_model, train

MODEL_NAMES = ("base", "expert_code", "expert_sql", "expert_shell")

#: Families the base sees often; the experts add the rest of their skill.
BASE_FAMILIES: dict[str, tuple[str, ...]] = {
    "code": ("add", "sub", "mul", "max2", "rev", "lsum"),
    "sql": ("gt", "eq", "counteq", "max"),
    "shell": ("lines", "head", "grep", "ls"),
}


@dataclass(frozen=True)
class WorldRecipe:
    """Everything that decides the built models (hashed into the manifest)."""

    shape: ModelShape = ModelShape()
    base: TrainSpec = TrainSpec(steps=700, lr=2e-3, batch_size=32)
    expert: TrainSpec = TrainSpec(steps=400, lr=3e-4, batch_size=32)
    # Relative frequency, in the base mixture, of a family that is not common: the base sees
    # every format but solves the rare families only in part (0.01 left a base that merges
    # collapsed around; more made the base nearly as good as the experts).
    rare_weight: dict[str, float] = field(default_factory=lambda: {"code": 0.03, "sql": 0.03, "shell": 0.03})
    base_families: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(BASE_FAMILIES))
    # Version of the item generators (cycleqd/mini/{code,sql,shell}.py): bump it when they
    # change what items they draw, so that cached worlds trained on the old items are rebuilt.
    items_version: int = 2
    # What each expert is fine-tuned on. "shared" (the default world): its skill's common
    # families, half of its skill's rare ones, and a quarter of each other skill's rare ones
    # (see :func:`expert_families`), so experts stay below the ceiling on their own skill and
    # part of every skill's know-how sits in another expert, where merging can reach it.
    # "own": every family of its own skill and nothing else.
    expert_mix: str = "shared"
    eval_test_n: int = 0  # the test split is for the final table only (`make table`)
    eval_val_n: int = 150


SIZES: dict[str, WorldRecipe] = {
    "default": WorldRecipe(),
    # For tests that need models which solve items (teams, trajectories, the worker's checks):
    # a smaller model trained briefly, each expert on every family of its own skill, so the
    # experts clearly solve their skill's common families. Builds in about a minute on one core.
    "small": WorldRecipe(
        shape=ModelShape(hidden=64, layers=2, heads=2, intermediate=172),
        base=TrainSpec(steps=500, lr=3e-3, batch_size=32),
        expert=TrainSpec(steps=200, lr=1e-3, batch_size=32),
        expert_mix="own",
        eval_val_n=30,
    ),
    # For tests: real training and scoring, just very little of it.
    "tiny": WorldRecipe(
        shape=ModelShape(hidden=32, layers=2, heads=2, intermediate=86),
        base=TrainSpec(steps=20, lr=3e-3, batch_size=8),
        expert=TrainSpec(steps=5, lr=1e-3, batch_size=8),
        eval_test_n=8,
        eval_val_n=0,
    ),
}


def recipe_hash(recipe: WorldRecipe) -> str:
    """Short hash of what decides the models, so a changed recipe rebuilds the cache.

    The sizes of the build's own score report (eval_*) do not change the models and are left out.
    """
    fields = {k: v for k, v in asdict(recipe).items() if not k.startswith("eval_")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _bucketed(items: list[MiniItem], batch: int, rng: random.Random) -> list[MiniItem]:
    """Reorder so each batch holds texts of similar length (less padding), batches in random order."""
    out: list[MiniItem] = []
    chunk = 8 * batch
    for k in range(0, len(items), chunk):
        part = sorted(items[k : k + chunk], key=lambda it: len(it.text))
        batches = [part[i : i + batch] for i in range(0, len(part), batch)]
        rng.shuffle(batches)
        out.extend(it for b in batches for it in b)
    return out


def base_mixture(recipe: WorldRecipe, seed: int) -> list[MiniItem]:
    """Training items of the base: all three skills, common families frequent, others rare."""
    for skill, mod in SKILLS.items():
        unknown = set(recipe.base_families[skill]) - set(mod.FAMILIES)
        if unknown:
            raise ValueError(f"base families {sorted(unknown)} are not {skill} families")
    need = recipe.base.steps * recipe.base.batch_size
    items: list[MiniItem] = []
    for k, (skill, mod) in enumerate(SKILLS.items()):
        common = set(recipe.base_families[skill])
        weights = {f: 1.0 if f in common else recipe.rare_weight[skill] for f in mod.FAMILIES}
        n = need // len(SKILLS) + (1 if k < need % len(SKILLS) else 0)
        items += skill_items(skill, "train", n, seed, weights=weights, distinct=False)
    rng = random.Random(f"base-mix:{seed}")
    rng.shuffle(items)
    return _bucketed(items, recipe.base.batch_size, rng)


def expert_families(recipe: WorldRecipe) -> dict[str, dict[str, tuple[str, ...]]]:
    """{expert skill: {skill: families its fine-tune set draws}} of the default skills.

    With ``expert_mix="shared"`` each skill's rare families (those outside
    ``base_families``), in their order, are dealt out: every other one to the skill's own
    expert, the rest in turn to the two other experts. An expert thus knows its common
    families, half of its rare ones and a quarter of each other skill's rare ones.
    With ``"own"`` an expert draws every family of its skill.

    Raises:
        ValueError: an unknown ``expert_mix``.
    """
    if recipe.expert_mix not in ("shared", "own"):
        raise ValueError(f"expert_mix must be 'shared' or 'own', got {recipe.expert_mix!r}")
    skills = list(SKILLS)
    if recipe.expert_mix == "own":
        return {s: {s: tuple(SKILLS[s].FAMILIES)} for s in skills}
    out: dict[str, dict[str, list[str]]] = {
        s: {s: [f for f in SKILLS[s].FAMILIES if f in recipe.base_families[s]]} for s in skills}
    for k, s in enumerate(skills):
        others = [skills[(k + 1) % len(skills)], skills[(k + 2) % len(skills)]]
        rare = [f for f in SKILLS[s].FAMILIES if f not in recipe.base_families[s]]
        for i, fam in enumerate(rare):
            owner = s if i % 2 == 0 else others[(i // 2) % 2]
            out[owner].setdefault(s, []).append(fam)
    return {e: {s: tuple(fams) for s, fams in mix.items()} for e, mix in out.items()}


def expert_data(skill: str, recipe: WorldRecipe, seed: int) -> list[MiniItem]:
    """Training items of one expert, every family in its mix (:func:`expert_families`) equally often.

    A skill outside the default world (an extra skill that grows a run) draws all its families.
    """
    need = recipe.expert.steps * recipe.expert.batch_size
    if skill not in SKILLS:
        items = skill_items(skill, "train", need, seed + 1000, distinct=False)
    else:
        mix = expert_families(recipe)[skill]
        total = sum(len(f) for f in mix.values())
        items, left = [], need
        for k, (other, fams) in enumerate(mix.items()):
            n = left if k == len(mix) - 1 else round(need * len(fams) / total)
            left -= n
            items += skill_items(other, "train", n, seed + 1000 + 17 * k, only=fams, distinct=False)
        random.Random(f"expert-mix:{skill}:{seed}").shuffle(items)
    return _bucketed(items, recipe.expert.batch_size, random.Random(f"expert:{skill}:{seed}"))


def _complete(out: Path) -> bool:
    return all((out / m / "config.json").is_file() and (out / m / "tokenizer.json").is_file() for m in MODEL_NAMES)


def read_manifest(out: str | Path) -> dict[str, Any] | None:
    """The world's manifest.json, or None if absent or unreadable."""
    p = Path(out) / "manifest.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def is_built(out: str | Path, seed: int = 0, size: str = "default") -> bool:
    """True if ``out`` holds all four models and a manifest for this seed, size and recipe."""
    m = read_manifest(out)
    return (
        m is not None
        and _complete(Path(out))
        and m.get("seed") == seed
        and m.get("size") == size
        and m.get("recipe") == recipe_hash(SIZES[size])
    )


def score_models(
    models: dict[str, Path], recipe: WorldRecipe, *, progress: bool = True, batch_size: int = 128
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, float]]:
    """Scores {split: {model: {skill: quality}}} on the test and val splits, and seconds per model."""
    from cycleqd.config import EngineConfig, SandboxConfig
    from cycleqd.engine.hf import HFEngine
    from cycleqd.registry import TASKS

    sandbox = SandboxConfig(allow_code_execution=True)
    tasks = {
        split: [TASKS.get(f"mini_{s}")(name=s, sandbox=sandbox, split=split, n=n, seed=0) for s in SKILLS]
        for split, n in (("test", recipe.eval_test_n), ("val", recipe.eval_val_n))
        if n > 0
    }
    scores: dict[str, dict[str, dict[str, float]]] = {split: {} for split in tasks}
    seconds: dict[str, float] = {}
    cfg = EngineConfig(device="cpu", batch_size=batch_size)
    for name, path in models.items():
        engine = HFEngine.from_path(str(path), cfg)
        t0 = time.perf_counter()
        for split, ts in tasks.items():
            scores[split][name] = {t.name: round(t.evaluate(engine).quality, 4) for t in ts}
        seconds[name] = round(time.perf_counter() - t0, 2)
        if progress:
            shown = ", ".join(f"{split} {scores[split][name]}" for split in tasks)
            print(f"  {name}: {shown} ({seconds[name]}s)", flush=True)
    return scores, seconds


def build_mini_world(
    dir: str | Path,
    seed: int = 0,
    size: str = "default",
    force: bool = False,
    progress: bool = True,
    threads: int = 1,
) -> Path:
    """Train (or reuse) the mini world in ``dir``; returns the folder.

    Writes ``dir/base``, ``dir/expert_{code,sql,shell}`` (plain Hugging Face folders)
    and ``dir/manifest.json`` (seed, size, recipe hash, scores, seconds). Skipped
    when the manifest already matches, unless ``force``. Training uses a fixed
    number of CPU threads (``threads``, at most the machine's), so a seed gives the
    same models on the same machine.

    Raises:
        ValueError: unknown ``size``.
    """
    if size not in SIZES:
        raise ValueError(f"unknown mini world size {size!r} (known: {', '.join(SIZES)})")
    out = Path(dir)
    if not force and is_built(out, seed, size):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others reuse its world
        if not force and is_built(out, seed, size):
            return out
        return _build(out, seed, size, progress, threads)


def _build(out: Path, seed: int, size: str, progress: bool, threads: int) -> Path:
    from cycleqd.mini.tokenizer import make_char_tokenizer

    recipe = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # an interrupted build is never mistaken for a finished one
    threads_before = torch.get_num_threads()
    n_threads = max(1, min(threads, os.cpu_count() or 1))
    torch.set_num_threads(n_threads)  # fixed thread count: same float reductions, same models
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    try:
        tok = make_char_tokenizer()
        if progress:
            print(f"building the mini world in {out} (seed {seed}, size {size})", flush=True)
        t0 = time.perf_counter()
        model = new_model(tok, recipe.shape, seed)
        base_losses = train(model, tok, base_mixture(recipe, seed), _seeded(recipe.base, seed), desc="base", progress=progress)
        _save(model, tok, out / "base")
        seconds["base"] = round(time.perf_counter() - t0, 2)
        base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        losses = {"base": base_losses[-20:]}
        for k, skill in enumerate(SKILLS):
            t0 = time.perf_counter()
            model.load_state_dict(base_state)
            spec = _seeded(recipe.expert, seed + 1 + k)
            ls = train(model, tok, expert_data(skill, recipe, seed), spec, desc=f"expert_{skill}", progress=progress)
            _save(model, tok, out / f"expert_{skill}")
            seconds[f"expert_{skill}"] = round(time.perf_counter() - t0, 2)
            losses[f"expert_{skill}"] = ls[-20:]
        t_train = time.perf_counter() - t_start
        scores, eval_seconds = score_models({m: out / m for m in MODEL_NAMES}, recipe, progress=progress)
    finally:
        torch.set_num_threads(threads_before)
    manifest = {
        "seed": seed,
        "size": size,
        "recipe": recipe_hash(recipe),
        "scores": scores,
        "train_seconds": seconds,
        "eval_seconds": eval_seconds,
        "build_seconds": round(time.perf_counter() - t_start, 1),
        "train_build_seconds": round(t_train, 1),
        "final_losses": {k: round(sum(v) / len(v), 4) for k, v in losses.items()},
        "threads": n_threads,
        "params": sum(p.numel() for p in model.parameters()),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if progress:
        print(f"mini world ready in {manifest['build_seconds']}s: {out}", flush=True)
    return out


def ensure_mini_world(cfg: Any, *, progress: bool = True) -> Path | None:
    """Build the mini world named by ``cfg.models.mini`` if it is not complete; None if the config has none."""
    mini = cfg.models.mini
    if mini is None:
        return None
    if mini.experts == "lora":
        return build_lora_experts(mini.dir, seed=mini.seed, size=mini.size, progress=progress)
    return build_mini_world(mini.dir, seed=mini.seed, size=mini.size, progress=progress)


def _seeded(spec: TrainSpec, seed: int) -> TrainSpec:
    return TrainSpec(**{**asdict(spec), "seed": seed})


def _save(model: torch.nn.Module, tok: Any, path: Path) -> None:
    model.save_pretrained(path)
    tok.save_pretrained(path)


# ---------------------------------------------------------------- LoRA experts

#: The adapters' recipe: every linear module of the Llama blocks.
RANK, ALPHA = 8, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR_SCALE = 10.0


def lora_dir(world: str | Path, skill: str) -> Path:
    """Where the LoRA expert of ``skill`` lives in a mini world."""
    return Path(world) / f"lora_{skill}"


def build_lora_experts(world: str | Path, *, seed: int = 0, size: str = "default", progress: bool = True,
                       force: bool = False) -> Path:
    """Train (or reuse) the LoRA experts of the mini world in ``world`` (built first if absent); returns ``world``.

    ``world/lora_{code,sql,shell}`` are PEFT LoRA folders (rank 8 on every linear module, alpha 16)
    trained from the base on the same data as the dense experts, only the adapters learning (a 10x
    higher learning rate, as LoRA fine-tunes use); ``world/lora_manifest.json`` records the recipe,
    and a finished build is reused.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cycleqd.mini.skills import SKILLS
    from cycleqd.mini.train import train

    world = build_mini_world(world, seed=seed, size=size, progress=progress)
    recipe = SIZES[size]
    stamp = {"seed": seed, "size": size, "recipe": recipe_hash(recipe), "rank": RANK, "alpha": ALPHA,
             "targets": list(TARGETS), "lr_scale": LR_SCALE, "skills": list(SKILLS)}
    done = world / "lora_manifest.json"
    if not force and done.is_file() and {k: v for k, v in json.loads(done.read_text()).items() if k in stamp} == stamp:
        return world
    done.unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(world / "base")
    seconds = {}
    for k, skill in enumerate(SKILLS):
        t0 = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained(world / "base", dtype=torch.float32)
        torch.manual_seed(seed + 101 + k)
        peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
        spec = _seeded(recipe.expert, seed + 1 + k)
        spec = replace(spec, lr=spec.lr * LR_SCALE)
        train(peft_model, tok, expert_data(skill, recipe, seed), spec, desc=f"lora_{skill}", progress=progress)
        peft_model.save_pretrained(str(lora_dir(world, skill)))
        # the adapter names its base by the folder it was trained from
        cfg_file = lora_dir(world, skill) / "adapter_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = str((world / "base").resolve())
        cfg_file.write_text(json.dumps(cfg, indent=2))
        seconds[skill] = round(time.perf_counter() - t0, 2)
    done.write_text(json.dumps({**stamp, "train_seconds": seconds}, indent=2))
    return world
