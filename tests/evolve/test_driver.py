"""The driver's per-child work stays bounded: the snapshot and the plots off the hot path, files as before."""
from __future__ import annotations

import json
import signal

import pytest

from cycleqd.config import parse_config
from cycleqd.evolve import loop
from cycleqd.evolve.pool import LocalPool
from cycleqd.evolve.worker import ChildWorker
from cycleqd.runs.folder import RunFolder
from cycleqd.runs.store import RunStore
from cycleqd.views.plots import PlotObserver


@pytest.fixture
def synthetic_store(tiny_family, tmp_path):
    cfg = parse_config({
        "name": "drv", "models": {"base": str(tiny_family["base"]), "experts": {t: str(tiny_family[t]) for t in "abc"}},
        "tasks": [{"name": t, "kind": "synthetic", "options": {"expert": k}} for k, t in enumerate("abc")],
        "evolution": {"generations": 40, "workers": 2, "final_merge": False},
        "prepare_cache": str(tmp_path / "cache")})
    return RunStore.create(tmp_path / "run", cfg), cfg


def test_snapshot_is_written_at_the_end_when_children_come_faster(synthetic_store, monkeypatch):
    """With the snapshot interval longer than the run, archives.json is written once at the end, matches
    the replayed log, and stats.jsonl still has a line per child; plots are drawn at the end."""
    store, cfg = synthetic_store
    monkeypatch.setattr(loop, "SNAPSHOT_SECONDS", 3600.0)
    writes = []
    real = store.write_archives
    monkeypatch.setattr(store, "write_archives", lambda snap: (writes.append(snap["generation"]), real(snap)))
    obs = PlotObserver(every=10, min_interval_s=0.0)
    pool = LocalPool([ChildWorker(cfg, index=i, threads=1) for i in range(2)])
    sched = loop.run_loop(store, pool, [obs])
    obs.run_done(store.path, sched.archive)
    assert writes[-1] == 40 and len([g for g in writes if g > 0]) == 1  # the seeds' snapshots, then one
    folder = RunFolder(store)
    assert folder.stale() is None
    snap = json.loads((store.path / "archives.json").read_text())
    assert snap["archives"] == folder.archive(40).to_json(40)["archives"]
    assert len(store.stats()) == 41
    assert (store.path / "plots" / "heatmaps.png").is_file() and (store.path / "plots" / "history.png").is_file()


def test_plot_observer_draws_in_another_process_at_most_one_at_a_time(synthetic_store):
    """child_done starts a drawing process and returns; while it runs no second one starts."""
    store, cfg = synthetic_store
    pool = LocalPool([ChildWorker(cfg, index=0, threads=1)])
    loop.run_loop(store, pool, [])
    obs = PlotObserver(every=1, min_interval_s=0.0)
    rec = store.children()[-1]
    obs.child_done(store.path, rec, None)
    first = obs._proc
    assert first is not None and first.pid
    obs.child_done(store.path, rec, None)
    assert obs._proc is first or first.poll() is not None
    obs.wait()
    assert first.returncode == 0
    assert (store.path / "plots" / "heatmaps.png").is_file()


def test_the_end_stops_a_background_drawing_and_draws_itself(synthetic_store):
    """run_done does not wait for a drawing still going: it ends it and draws the final plots in this
    process; no half-written picture is left."""
    store, cfg = synthetic_store
    loop.run_loop(store, LocalPool([ChildWorker(cfg, index=0, threads=1)]), [])
    obs = PlotObserver(every=1, min_interval_s=0.0)
    obs.child_done(store.path, store.children()[-1], None)
    drawing = obs._proc
    assert drawing is not None and drawing.poll() is None  # a fresh process: still importing
    obs.run_done(store.path, None)
    assert drawing.returncode == -signal.SIGKILL and obs._proc is None
    plots = store.path / "plots"
    assert (plots / "heatmaps.png").stat().st_size > 0 and (plots / "history.png").stat().st_size > 0
    assert not list(plots.glob(".*.tmp"))  # a picture the killed drawing began is replaced whole
