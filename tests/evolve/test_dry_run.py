"""The dry run: `cycleqd evolve --config experiments/dry_run.yaml` (synthetic tasks, genome-only) end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_dry_run_config_runs_end_to_end(tmp_path):
    """The shipped dry-run config fills the archives beyond the seeds, draws plots and merges, with no engine."""
    run = tmp_path / "run"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    out = subprocess.run([str(BIN / "cycleqd"), "-q", "evolve", "--config", "experiments/dry_run.yaml",
                          "--generations", "60", "--run-dir", str(run)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    # its time (under a minute on a machine of its own) is a benchmark's figure, not a test's: printed here
    print(f"dry run: 60 children in {took:.0f} s at load {os.getloadavg()[0]:.1f}")
    children = [json.loads(line) for line in (run / "children.jsonl").read_text().splitlines()]
    assert sorted(c["id"] for c in children) == [f"g{i:06d}" for i in range(1, 61)]  # each once, any order
    assert all(c["error"] is None for c in children)
    snap = json.loads((run / "archives.json").read_text())
    assert snap["generation"] == 60
    summary = json.loads((run / "summary.json").read_text())
    seeds = summary["experts"]
    # the archives filled as in a real run: children beside the seeds in every archive, and a child
    # whose mean beats every expert's (which child, and by how much on each skill, depends on the
    # order in which two workers finish, so no single skill's best is held to a bound)
    cells = {t: len(a["elites"]) for t, a in snap["archives"].items()}
    assert all(n > 3 for n in cells.values()), cells
    assert summary["best_mean"]["mean"] > max(e["mean"] for e in seeds.values()) + 0.05, summary["best_mean"]
    assert any((run / "plots").iterdir())
    assert (run / "final_merge.json").is_file()
