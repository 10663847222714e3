"""The mini world's SVD mutation rate, chosen on val only.

    python experiments/sweep_mutation.py 100 0.1,0.25,0.5   # -> experiments/results/mini_mutation_sweep.json

One run per rate (seed 0, the given number of children, experiments/mini.yaml otherwise),
evolved on the first 100 val items per task. Each run's top 5 elites by their own mean are
re-scored on the next 200 val items per task, which evolution never scored (the same
selection sample ``make table`` uses), and the best of them is reported. No test item is read.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from cycleqd.config import load_config, parse_config
from cycleqd.evolve.loop import evolve
from cycleqd.runs.folder import RunFolder
from cycleqd.runs.store import RunStore
from cycleqd.studies.table import Scorer, _ensure_world, _mean, _quality, selection_config, variant_config


def main(generations: int, rates: list[float], out: Path) -> list[dict]:
    cfg = _ensure_world(load_config("experiments/mini.yaml"))
    val = Scorer(selection_config(variant_config(cfg, "cycleqd", 0, generations, 100), 200))
    results = []
    for rate in rates:
        data = variant_config(cfg, "cycleqd", 0, generations, 100).model_dump()
        data["evolution"]["mutation"]["rate"] = rate
        run = Path(f"archives/sweep/rate{rate}-g{generations}")
        t0 = time.time()
        if not (run / "summary.json").exists():
            evolve(parse_config(data), run, progress=True)
        store, snap = RunStore(run), RunFolder(run).snapshot()
        elites = {e["genome"]: e for a in snap.archives.values() for e in a["elites"]}
        shortlist = sorted(elites.values(), key=lambda e: -_mean(e["scores"]))[:5]
        scored = [(e, _quality(val.genome(store.load_genome(e["genome"])))) for e in shortlist]
        best, q = max(scored, key=lambda r: _mean(r[1]))
        results.append({"rate": rate, "children": generations, "seconds": round(time.time() - t0),
                        "best": best["genome"], "val": {k: round(v, 3) for k, v in q.items()},
                        "val_mean": round(_mean(q), 3),
                        "shortlist_val_means": [round(_mean(s), 3) for _, s in scored]})
        print(json.dumps(results[-1]), flush=True)
    out.write_text(json.dumps({"split": "val", "select_n": 200, "evolve_n": 100, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main(int(sys.argv[1]), [float(r) for r in sys.argv[2].split(",")],
         Path(sys.argv[3] if len(sys.argv) > 3 else "experiments/results/mini_mutation_sweep.json"))
