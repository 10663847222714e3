"""The paper's table in miniature: `make table` -> experiments/results/mini_table.json.

Rows, all scored on the test split (never used for any choice):
base, expert_<task>, task_arithmetic and ties (mergekit, merge weight chosen on
the validation split), cycleqd_best (the archive model with the best validation
mean), cycleqd_merged (the final merge), and the ablations fixed_axes,
gaussian_mutation and uniform_sampling, each CycleQD variant over several seeds.
Runs are ordinary run folders under archives/table/ and are resumed, not
redone, when the table is made again.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from cycleqd.config import Config, ConfigError, load_config, parse_config, resolve_paths

VARIANTS: dict[str, dict[str, Any]] = {
    "cycleqd": {},
    "fixed_axes": {"fixed_quality_task": "__first__"},
    "gaussian_mutation": {"mutation": {"name": "gaussian"}},
    "uniform_sampling": {"sampling": {"name": "uniform"}},
}
MERGE_WEIGHTS = [0.3, 0.4, 0.5, 0.6, 0.8]


def split_config(cfg: Config, split: str, n: int | None = None) -> Config:
    """``cfg`` with every task reading ``split`` (and ``n`` items if given)."""
    data = cfg.model_dump()
    for t in data["tasks"]:
        t["options"] = {**t["options"], "split": split, **({"n": n} if n else {})}
    return parse_config(data)


def selection_config(evolve_cfg: Config, n: int) -> Config:
    """``n`` val items per task that the evolution never saw: the same draw, past its items.

    Choosing which elite is "best" on the items evolution optimised would favour the
    elites that were lucky on them, so choices are made on the next ``n`` items of the
    evolution's own draw (``skip`` = the evolution's ``n``).
    """
    data = evolve_cfg.model_dump()
    for t in data["tasks"]:
        opts = t["options"]
        if "n" not in opts:
            raise ConfigError(f"task {t['name']}: the table needs options.n (items scored during evolution)")
        t["options"] = {**opts, "skip": int(opts.get("skip", 0)) + int(opts["n"]), "n": n}
    return parse_config(data)


def variant_config(cfg: Config, variant: str, seed: int, generations: int | None,
                   evolve_n: int | None = None) -> Config:
    data = split_config(cfg, "val", evolve_n).model_dump()
    data["seed"] = seed
    data["name"] = f"{cfg.name}-{variant}"
    evo = data["evolution"]
    for key, value in VARIANTS[variant].items():
        if value == "__first__":
            value = cfg.task_names[0]
        evo[key] = {**evo[key], **value} if isinstance(value, dict) else value
    if generations is not None:
        evo["generations"] = generations
    return parse_config(data)


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """'path: old -> new' for every leaf where two config dumps differ."""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        a, b = dict(enumerate(a)), dict(enumerate(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{path}.{k}".lstrip("."))]
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def check_same_experiment(stored: Config, wanted: Config, run: Path) -> None:
    """A table run folder is resumed only if it holds the same experiment (generations aside).

    Raises:
        ConfigError: the folder was made with other settings (e.g. the YAML changed since).
    """
    a, b = resolve_paths(stored).model_dump(mode="json"), resolve_paths(wanted).model_dump(mode="json")
    a["evolution"]["generations"] = b["evolution"]["generations"]
    diff = _differences(a, b)
    if diff:
        raise ConfigError(f"{run} was made with other settings ({'; '.join(diff[:3])}); "
                          "remove it or pass --runs-root to make the table in a new folder")


class Scorer:
    """One resident model and the tasks of a split; scores genomes or plain state dicts."""

    def __init__(self, cfg: Config):
        from cycleqd.worker import ChildWorker

        self.worker = ChildWorker(cfg, threads=torch.get_num_threads())
        self.factors = self.worker.factors

    def genome(self, genome) -> dict[str, float]:
        return self.worker.evaluate(genome)[0]

    def state(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        self.worker.engine.load_weights(state)
        return {n: float(t.evaluate(self.worker.engine).quality) for n, t in self.worker.tasks.items()}


def _mean(scores: Mapping[str, float]) -> float:
    return float(sum(scores.values()) / len(scores))


def mergekit_merge(factors, method: str, weight: float) -> dict[str, torch.Tensor]:
    """task_arithmetic / ties over the experts with mergekit's in-memory API."""
    from mergekit.merge_methods import merge_state_dicts

    from cycleqd.genome import Genome, materialize

    models = {"base": materialize(Genome.base(factors), factors)}
    for k, t in enumerate(factors.task_names):
        models[t] = materialize(Genome.seed(k, factors), factors)
    params: dict[str, Any] = {"weight": weight}
    if method == "ties":
        params["density"] = 0.5
    return merge_state_dicts(models, method, parameters=params, base="base")


def _row(model: str, per_seed: list[dict[str, float]]) -> dict:
    tasks = list(per_seed[0])
    means = [_mean(s) for s in per_seed]
    return {
        "model": model,
        "scores": {t: statistics.fmean(s[t] for s in per_seed) for t in tasks},
        "mean": statistics.fmean(means),
        "std": statistics.stdev(means) if len(means) > 1 else 0.0,
        "seeds": len(per_seed),
    }


def make_table(cfg: Config, out: Path, *, seeds: int = 3, generations: int | None = None,
               runs_root: Path = Path("archives/table"), test_n: int | None = None,
               variants: list[str] | None = None, evolve_n: int | None = None, select_n: int = 200,
               shortlist_k: int = 5) -> dict:
    from cycleqd.genome import Genome
    from cycleqd.run import evolve, resume
    from cycleqd.runfolder import RunFolder
    from cycleqd.store import RunStore

    cfg = resolve_paths(cfg)
    if cfg.models.mini is not None:
        from cycleqd.mini.build import ensure_mini_world

        ensure_mini_world(cfg)
    rows = []
    # Model choices (merge weights, which elite) are made on val items that evolution never
    # scored: picking the best of many elites on the evolution's own noisy scores would
    # favour lucky ones.
    val = Scorer(selection_config(variant_config(cfg, "cycleqd", 0, generations, evolve_n), select_n))
    test = Scorer(split_config(cfg, "test", test_n))
    f = test.factors
    rows.append(_row("base", [test.genome(Genome.base(f))]))
    for k, t in enumerate(cfg.task_names):
        rows.append(_row(f"expert_{t}", [test.genome(Genome.seed(k, f))]))
        print(f"{rows[-1]['model']}: {rows[-1]['scores']}", flush=True)
    for method in ("task_arithmetic", "ties"):
        # the merge weight is chosen on the validation split
        best_w = max(MERGE_WEIGHTS, key=lambda w: _mean(val.state(mergekit_merge(f, method, w))))
        row = _row(method, [test.state(mergekit_merge(f, method, best_w))])
        row["weight"] = best_w
        rows.append(row)
        print(f"{method} (weight {best_w}): {row['scores']}", flush=True)

    for variant in variants or list(VARIANTS):
        best, merged = [], []
        for seed in range(seeds):
            vcfg = variant_config(cfg, variant, seed, generations, evolve_n)
            run = runs_root / f"{variant}-s{seed}"
            if (run / "config.yaml").exists():
                check_same_experiment(RunStore(run).config(), vcfg, run)
                resume(run, generations=vcfg.evolution.generations, progress=True)
            else:
                evolve(vcfg, run, progress=True)
            store = RunStore(run)
            # the run's top elites by its own mean, re-scored on the selection sample
            snap = RunFolder(run).snapshot()
            elites = {e["genome"]: e for a in snap.archives.values() for e in a["elites"]}
            shortlist = sorted(elites.values(), key=lambda e: -_mean(e["scores"]))[:shortlist_k]
            top = max(shortlist, key=lambda e: _mean(val.genome(store.load_genome(e["genome"]))))
            best.append(test.genome(store.load_genome(top["genome"])))
            fm = store.final_merge()
            if fm and fm.get("error") is None:
                merged.append(test.genome(store.load_genome(fm["genome"])))
            print(f"{variant} seed {seed}: best {best[-1]}", flush=True)
        name = "cycleqd_best" if variant == "cycleqd" else variant
        rows.append(_row(name, best))
        if variant == "cycleqd" and merged:
            rows.append(_row("cycleqd_merged", merged))
    table = {"split": "test", "test_n": test_n, "generations": generations or cfg.evolution.generations,
             "evolve_n": evolve_n, "select": {"split": "val", "n": select_n, "disjoint_from_evolution": True,
                        "shortlist": shortlist_k},
             "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2))
    return table


def plot_table(table: dict, path: Path) -> None:
    """Bar chart of the 3-task mean (error bars: std over seeds) per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    colors = ["#999" if not r["model"].startswith(("cycleqd", "fixed", "gauss", "uniform")) else "#2a7"
              for r in rows]
    ax.bar(range(len(rows)), [r["mean"] for r in rows], yerr=[r["std"] for r in rows], color=colors, capsize=3)
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=35, ha="right")
    ax.set_ylabel("mean over tasks (test)")
    ax.set_title("mini world: CycleQD vs experts and merges")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="experiments/mini.yaml")
    ap.add_argument("--out", default="experiments/results/mini_table.json")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--generations", type=int)
    ap.add_argument("--test-n", type=int, default=300, help="test items per task (default 300)")
    ap.add_argument("--evolve-n", type=int, help="val items per task scored during evolution (default: config)")
    ap.add_argument("--select-n", type=int, default=200,
                    help="val items per task, unseen by evolution, for choosing models (default 200)")
    ap.add_argument("--runs-root", default="archives/table", help="folder of the table's runs")
    ap.add_argument("--variants", help="comma-separated subset of " + ",".join(VARIANTS))
    a = ap.parse_args(argv)
    try:
        table = make_table(load_config(a.config), Path(a.out), seeds=a.seeds, generations=a.generations,
                           test_n=a.test_n, variants=a.variants.split(",") if a.variants else None,
                           evolve_n=a.evolve_n, select_n=a.select_n, runs_root=Path(a.runs_root))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plot_table(table, Path(a.out).with_suffix(".png"))
    for r in table["rows"]:
        print(f"{r['model']:20s} mean {r['mean']:.3f} ± {r['std']:.3f}  " +
              "  ".join(f"{t} {v:.3f}" for t, v in r["scores"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
