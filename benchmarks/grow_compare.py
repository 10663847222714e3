"""A grown run beside its experts and a task-arithmetic merge of all of them.

    python benchmarks/grow_compare.py RUN [--split val|test] [--n 100] [--json OUT]

Rows: each seed expert, task_arithmetic over all K experts (mergekit; weight chosen
on the validation split from cycleqd.studies.table.MERGE_WEIGHTS), and the archive elite
with the best K-task mean on the validation split. On ``--split val`` the experts'
and elites' scores are the run's own logged ones; on ``test`` every row is scored
again on the test split (never used for any choice).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from cycleqd.runs.store import RunStore
    from cycleqd.studies.table import MERGE_WEIGHTS, Scorer, _mean, mergekit_merge, split_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--json")
    a = p.parse_args(argv)
    store = RunStore(a.run)
    cfg = store.config()
    tasks = cfg.task_names
    snap = store.archives()
    elites = {e["genome"]: e for x in snap["archives"].values() for e in x["elites"]}
    best = max(elites.values(), key=lambda e: _mean(e["scores"]))
    val = Scorer(split_config(cfg, "val", a.n))
    weight = max(MERGE_WEIGHTS, key=lambda w: _mean(val.state(mergekit_merge(val.factors, "task_arithmetic", w))))
    rows: dict[str, dict[str, float]] = {}
    if a.split == "val":
        for t, s in store.seeds().items():
            rows[f"expert_{t}"] = dict(s["scores"])
        rows[f"task_arithmetic (w={weight})"] = val.state(mergekit_merge(val.factors, "task_arithmetic", weight))
        rows[f"cycleqd best elite {best['genome']}"] = dict(best["scores"])
    else:
        test = Scorer(split_config(cfg, "test", a.n))
        for t, s in store.seeds().items():
            rows[f"expert_{t}"] = test.genome(store.load_genome(s["genome"]))
        rows[f"task_arithmetic (w={weight})"] = test.state(mergekit_merge(test.factors, "task_arithmetic", weight))
        rows[f"cycleqd best elite {best['genome']}"] = test.genome(store.load_genome(best["genome"]))
    print(f"{a.run}: generation {snap['generation']}, {a.split} split (n={a.n} per task)")
    print(f"{'model':34s}" + "".join(f"{t:>8s}" for t in tasks) + f"{'mean':>8s}")
    for name, s in rows.items():
        print(f"{name:34s}" + "".join(f"{s[t]:8.3f}" for t in tasks) + f"{_mean(s):8.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"run": a.run, "split": a.split, "generation": snap["generation"],
                                            "rows": {k: {**v, "mean": _mean(v)} for k, v in rows.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
