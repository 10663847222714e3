"""The loop as a library, in process and without Ray: ask/tell order, a failed child, a resume."""
from __future__ import annotations

import pytest

from cycleqd.config import parse_config
from cycleqd.evolve.loop import run_loop
from cycleqd.evolve.pool import LocalPool
from cycleqd.evolve.worker import ChildWorker
from cycleqd.runs.folder import RunFolder
from cycleqd.runs.store import RunStore
from cycleqd.search.archive import Archive
from cycleqd.search.child import ChildResult
from cycleqd.search.scheduler import OrderError, Scheduler

TEXTS = {"a": "def f(x): return x + 1\n", "b": "select name from t\n", "c": "ls -la /tmp\n"}
BINS = {"lo": 0.0150, "hi": 0.0165, "count": 6}


@pytest.fixture(scope="module")
def cfg_data(tiny_family, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("sched")
    tasks = []
    for t, text in TEXTS.items():
        (d / f"{t}.txt").write_text(text)
        tasks.append({"name": t, "kind": "likelihood", "data": str(d / f"{t}.txt"), "bins": BINS})
    return {"name": "sched", "seed": 5,
            "models": {"base": str(tiny_family["base"]), "experts": {t: str(tiny_family[t]) for t in TEXTS}},
            "tasks": tasks, "evolution": {"generations": 4, "workers": 1, "final_merge": False},
            "engine": {"device": "cpu"}, "prepare_cache": str(d / "cache")}


@pytest.fixture(scope="module")
def worker(cfg_data) -> ChildWorker:
    return ChildWorker(parse_config(cfg_data), threads=1)


def _cfg(data: dict, generations: int):
    return parse_config({**data, "evolution": {**data["evolution"], "generations": generations}})


def _seeded_archive(cfg) -> Archive:
    arch = Archive(cfg.task_names, {t.name: t.bins for t in cfg.tasks})
    for k, t in enumerate(cfg.task_names):
        arch.offer(f"seed_{t}", {u: 0.0155 + 0.0003 * (u == t) for u in cfg.task_names}, 0)
    return arch


def _result(spec, score: float = 0.016) -> ChildResult:
    return ChildResult(spec.id, b"", {t: score for t in "abc"})


def test_tell_refuses_a_spec_never_asked_or_told_twice(cfg_data):
    cfg = _cfg(cfg_data, 10)
    sched = Scheduler(cfg, _seeded_archive(cfg))
    first, second = sched.ask(), sched.ask()
    assert (first.id, second.id) == ("g000001", "g000002")
    assert [first.quality_task, second.quality_task] == ["a", "b"]  # the quality task rotates per child
    other = Scheduler(cfg, _seeded_archive(cfg)).ask()  # same index, but another scheduler's spec
    forged = first.__class__(**{**first.__dict__, "index": 7, "id": "g000008"})
    with pytest.raises(OrderError, match="never asked"):
        sched.tell(forged, _result(forged))
    with pytest.raises(OrderError, match="result of g000002"):
        sched.tell(first, _result(second))
    rec = sched.tell(second, _result(second))  # out of order is fine: generation counts finished children
    assert (rec.generation, rec.index, rec.id) == (1, 1, "g000002")
    with pytest.raises(OrderError, match="told already"):
        sched.tell(second, _result(second))
    assert sched.tell(first, _result(first)).generation == 2
    assert other.id == first.id and sched.in_flight == 0


def test_a_failed_child_is_logged_and_not_offered(cfg_data):
    cfg = _cfg(cfg_data, 10)
    sched = Scheduler(cfg, _seeded_archive(cfg))
    spec = sched.ask()
    rec = sched.tell(spec, ChildResult(spec.id, None, {}, error="ValueError: boom"))
    assert not rec.ok and rec.error == "ValueError: boom" and rec.inserted == () and rec.generation == 1
    assert spec.id not in {e.genome for e in sched.archive.all_elites()}


def _loop(data: dict, run, generations: int, worker: ChildWorker) -> Scheduler:
    cfg = _cfg(data, generations)
    store = RunStore(run) if (run / "config.yaml").exists() else RunStore.create(run, cfg)
    if store.config() != cfg:
        from cycleqd.atomic import write_atomic
        from cycleqd.config import dump_config

        write_atomic(run / "config.yaml", dump_config(cfg))
    worker.cfg = cfg
    return run_loop(store, LocalPool([worker]))


def test_the_loop_in_process_resumes_to_the_same_run(cfg_data, worker, tmp_path):
    straight = _loop(cfg_data, tmp_path / "straight", 5, worker)
    _loop(cfg_data, tmp_path / "split", 2, worker)
    resumed = _loop(cfg_data, tmp_path / "split", 5, worker)
    a, b = RunFolder(tmp_path / "straight"), RunFolder(tmp_path / "split")
    assert straight.generation == resumed.generation == 5
    assert [c.id for c in a.children] == [c.id for c in b.children] == [f"g{i:06d}" for i in range(1, 6)]
    assert [c.generation for c in b.children] == [1, 2, 3, 4, 5]
    for x, y in zip(a.children, b.children):
        assert x.scores == pytest.approx(y.scores, abs=1e-12) and x.parents == y.parents and x.seed == y.seed
    assert a.snapshot().archives == b.snapshot().archives
    assert a.stale() is None and b.stale() is None  # archives.json matches the log


def test_a_child_with_an_unreadable_parent_fails_and_the_loop_goes_on(cfg_data, worker, tmp_path):
    run = tmp_path / "run"
    _loop(cfg_data, run, 0, worker)  # seed experts only
    for t in "abc":  # every parent unreadable: every child fails at the worker boundary
        (run / "genomes" / f"seed_{t}.safetensors").write_bytes(b"not a genome")
    sched = _loop(cfg_data, run, 3, worker)
    children = RunFolder(run).children
    assert sched.generation == 3 and len(children) == 3
    assert all(not c.ok and "genome" in c.error for c in children)
    assert not any((run / "genomes" / f"{c.id}.safetensors").exists() for c in children)
