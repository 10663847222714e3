"""Short in-process CycleQD runs in the mini world, for the team and trajectory tests."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from cycleqd.config import parse_config, resolve_paths


def mini_config_data(world: Path, size: str, n: int, config: str | Path = "experiments/mini.yaml") -> dict:
    """``config`` (a mini-world experiment) as a dict, its models the ``size`` world's in ``world``,
    ``n`` val items per task and 4 bins per axis."""
    data = yaml.safe_load(Path(config).read_text())
    data["models"] = {"base": str(world / "base"), "dtype": "float32",
                      "experts": {t: str(world / f"expert_{t}") for t in ("code", "sql", "shell")},
                      "mini": {"dir": str(world), "seed": 0, "size": size}}
    for t in data["tasks"]:
        t["options"]["n"] = n
        t["bins"] = {"lo": 0.0, "hi": 1.0, "count": 4}
    return data


def make_mini_run(root: Path, world: Path, size: str, *, n: int = 8, generations: int = 3,
                  record: bool = True, edit: Callable[[dict], None] | None = None) -> Path:
    """A run of ``generations`` children over the mini world in ``world`` (built there if absent), no Ray.

    Tasks score ``n`` val items each; archives have 4 bins per axis; episodes are recorded.
    ``edit`` changes the config's data (a dict) before it is parsed.
    """
    from cycleqd.evolve.loop import run_loop, summarize
    from cycleqd.evolve.pool import LocalPool
    from cycleqd.evolve.worker import ChildWorker
    from cycleqd.mini.build import ensure_mini_world
    from cycleqd.runs.store import RunStore, check_models

    data = mini_config_data(world, size, n)
    data["evolution"].update(workers=1, generations=generations, final_merge=False, record_episodes=record)
    data["prepare_cache"] = str(root / "prepare")
    if edit is not None:
        edit(data)
    cfg = resolve_paths(parse_config(data))
    ensure_mini_world(cfg, progress=False)
    store = RunStore.create(root / "run", cfg)
    check_models(store, cfg)
    run_loop(store, LocalPool([ChildWorker(cfg, threads=1)]), [])
    summarize(store)
    return store.path


def make_lora_run(root: Path, world: Path, specs: dict[str, dict], *, seed: int, generations: int,
                  evolution: dict | None = None) -> Path:
    """:func:`make_mini_run` (6 val items per task, no episodes) over random LoRA experts of the small
    world ``world``'s base: ``specs`` maps each skill to its PEFT settings (rank, alpha, target modules);
    ``evolution`` overrides evolution settings."""
    from tiny_models import make_lora_experts

    experts = make_lora_experts(world / "base", root, specs, seed=seed, merged=False, magnitude=0.3)

    def on_lora_experts(data: dict) -> None:
        data["models"] = {"base": str(world / "base"), "dtype": "float32",
                          "experts": {t: str(experts[t]["adapter"]) for t in specs}}
        data["evolution"].update(evolution or {})

    return make_mini_run(root, world, "small", n=6, generations=generations, record=False, edit=on_lora_experts)
