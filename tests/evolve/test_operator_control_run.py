"""A run with CMA-ES operator control (the official qd.use_cma): two children in flight, SIGKILL mid-run,
resume; the solvers' log in the run folder replays and every child carries its operator parameters."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import yaml
from run_helpers import BINS, TEXTS

from cycleqd.runs.folder import RunFolder
from cycleqd.runs.store import RunStore
from cycleqd.search.archive import Archive
from cycleqd.search.operator_control import FILE, OperatorControl, operator_params

_RUN = """
import sys, yaml
from cycleqd.config import parse_config
from cycleqd.evolve.loop import run_loop
from cycleqd.evolve.pool import LocalPool
from cycleqd.evolve.worker import ChildWorker
from cycleqd.runs.store import RunStore
from pathlib import Path
cfg = parse_config(yaml.safe_load(Path(sys.argv[1]).read_text()))
run = Path(sys.argv[2])
if (run / "config.yaml").exists():  # a resume, to the total of generations given
    from cycleqd.atomic import write_atomic
    from cycleqd.config import dump_config, with_overrides
    store = RunStore(run)
    write_atomic(run / RunStore.CONFIG, dump_config(with_overrides(store.config(), generations=int(sys.argv[3]))))
    store = RunStore(run)
else:
    store = RunStore.create(run, cfg)
worker = ChildWorker(cfg, threads=1)
run_loop(store, LocalPool([worker, worker]))  # two slots: two children in flight at every ask
"""


def test_cma_run_is_killed_and_resumes(tiny_family, tmp_path):
    """The loop (two children in flight) with operator_control: cma is SIGKILLed after 5 children and
    resumed for 8 more (at least 14 in all): no child is logged twice, every child carries its operator
    parameters, the solvers' log replays, and each child's parameters are the official formula of its
    parents' bins and candidate."""
    tasks = []
    for t in "abc":
        (tmp_path / f"{t}.txt").write_text("\n".join(TEXTS[t]) + "\n")
        tasks.append({"name": t, "kind": "likelihood", "data": str(tmp_path / f"{t}.txt"), "bins": BINS})
    cfg = {"name": "cma", "seed": 1, "tasks": tasks,
           "models": {"base": str(tiny_family["base"]), "experts": {t: str(tiny_family[t]) for t in "abc"}},
           "evolution": {"generations": 1000, "workers": 2, "final_merge": False,
                         "mutation": {"name": "svd", "rank": 8},
                         "operator_control": {"name": "cma", "popsize": 2, "sigma": 0.01, "seed": 42}},
           "engine": {"device": "cpu"}, "prepare_cache": str(tmp_path / "cache")}
    config = tmp_path / "cma.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _RUN, str(config), str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = run / "children.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"run ended before the kill: {proc.stderr.read().decode()[-800:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(RunStore(run).children())
    assert (run / FILE).exists() and 5 <= before < 1000  # far more generations than can run before the kill
    target = max(14, before + 8)
    res = subprocess.run([sys.executable, "-c", _RUN, str(config), str(run), str(target)], capture_output=True,
                         text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stderr[-2000:]

    children = RunStore(run).children()
    assert len(children) >= target and len({c.id for c in children}) == len(children)
    assert all(c.operators is not None and len(c.operators) == 3 for c in children)
    # the log replays into fresh solvers (every replayed population equals the logged one) ...
    store = RunStore(run)
    cfg_run = store.config()
    arch = Archive(cfg_run.task_names, {t.name: t.bins for t in cfg_run.tasks})
    control = OperatorControl(cfg_run.evolution.operator_control, arch, run)
    events = [yaml.safe_load(line) for line in (run / FILE).read_text().splitlines()]
    told = [e for e in events if e["event"] == "tell"]
    assert len(told) >= 3 and {e["task"] for e in told} == set("abc")
    # ... and each logged child's parameters are its parents' normalised cells times its candidate
    asks = {(e["task"], e["population"]): e["candidates"] for e in events if e["event"] == "ask"}
    fits = {e["child"]: e for e in events if e["event"] == "fitness"}
    scores = {s["genome"]: s["scores"] for s in RunFolder(store).seeds.values()}
    scores.update({c.id: c.scores for c in children if c.ok})
    checked = 0
    for c in children:
        f = fits.get(c.index)
        if f is None:  # a child that never came back before the kill
            continue
        q = c.quality_task
        x = np.asarray(asks[(q, f["population"])][f["slot"]])
        parent_cells = [arch.cell(q, scores[p]) for p in c.parents]
        counts = [arch.bins[t].count for t in arch.others(q)]
        assert np.allclose(c.operators, operator_params(x, parent_cells, counts), rtol=1e-12, atol=1e-15)
        checked += 1
    assert checked >= 10 and control.tasks["a"].asked >= 1
    assert all(abs(v) < 1.0 for c in children for v in c.operators)  # sigma0 0.01 around zero
