"""The evolve loop end to end: 2 Ray workers on tiny Llamas, SIGKILL mid-run, resume, exact replay."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cycleqd.config import parse_config
from cycleqd.evolve.worker import ChildWorker
from cycleqd.runs.store import RunStore
from cycleqd.search.child import ChildSpec

TEXTS = {
    "a": ["def add(a, b): return a + b", "for i in range(3): print(i)"],
    "b": ["select name from people where age > 30;", "select count(*) from t;"],
    "c": ["ls -la /tmp | wc -l", "grep -c foo a.txt"],
}


@pytest.fixture(scope="module")
def run_config(tiny_family, tmp_path_factory) -> Path:
    """A 3-task config over the tiny family with real likelihood tasks; bins span the experts' scores."""
    d = tmp_path_factory.mktemp("runcfg")
    tasks = []
    for t, lines in TEXTS.items():
        (d / f"{t}.txt").write_text("\n".join(lines) + "\n")
        tasks.append({"name": t, "kind": "likelihood", "data": str(d / f"{t}.txt")})
    cfg = {
        "name": "tiny",
        "seed": 0,
        "models": {"base": str(tiny_family["base"]), "experts": {t: str(tiny_family[t]) for t in TEXTS}},
        "tasks": tasks,
        "evolution": {"generations": 20, "workers": 2, "mutation": {"name": "svd", "rate": 0.1, "rank": 8}},
        "engine": {"name": "transformers", "device": "cpu"},
        "prepare_cache": str(d / "cache"),
    }
    # bins around the seed experts' scores, measured with an in-process worker
    worker = ChildWorker(parse_config(cfg), threads=1)
    from cycleqd.model.genome import Genome

    scores = [worker.evaluate(Genome.seed(k, worker.factors))[0] for k in range(3)]
    for t in tasks:
        vals = [s[t["name"]] for s in scores]
        lo, hi = min(vals), max(vals)
        t["bins"] = {"lo": max(0.0, lo - (hi - lo)), "hi": min(1.0, hi + (hi - lo)), "count": 6}
    path = d / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cycleqd(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "cycleqd.cli", "-q", *args], capture_output=True, text=True,
                          env=env, timeout=600, **kw)


def _show(run: Path) -> dict:
    out = _cycleqd("show", str(run), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def killed_and_resumed(run_config, tmp_path_factory) -> tuple[Path, dict, dict]:
    """A 20-generation run SIGKILLed after >= 8 children, then resumed: (run, show before, show after)."""
    run = tmp_path_factory.mktemp("killed") / "run"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cycleqd.cli", "-q", "evolve", "--config", str(run_config), "--run-dir", str(run),
         "--workers", "2", "--generations", "20"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=False,
    )
    log = run / "children.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 8:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"run ended before the kill: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _show(run)
    res = _cycleqd("resume", str(run))
    assert res.returncode == 0, res.stderr[-2000:]
    return run, before, _show(run)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_loses_nothing(killed_and_resumed):
    run, before, after = killed_and_resumed
    assert before["generation"] >= 7
    children = RunStore(run).children()
    assert after["generation"] >= 20 and len(children) >= 20
    assert len({c.id for c in children}) == len(children)  # no child logged twice
    assert [c.generation for c in children] == list(range(1, len(children) + 1))  # generation = log line
    for task, arch in before["archives"].items():
        kept = {tuple(e["cell"]): e["quality"] for e in after["archives"][task]["elites"]}
        for e in arch["elites"]:
            assert tuple(e["cell"]) in kept, f"{task}: cell {e['cell']} lost"
            assert kept[tuple(e["cell"])] >= e["quality"] - 1e-12
    # the quality task rotates every child asked (by ask index: a child in flight at the kill is not
    # logged, and the resumed run asks on from the last index logged)
    assert all(c.quality_task == "abc"[c.index % 3] for c in children), [(c.index, c.quality_task) for c in children]
    assert {c.quality_task for c in children[:6]} == set("abc")
    # every archive holds more than the seed experts, and every task was scored on every child
    assert all(len(after["archives"][t]["elites"]) >= 2 for t in "abc")
    assert all(set(c.scores) == set("abc") for c in children if c.ok)
    assert RunStore(run).final_merge()["scores"].keys() == set("abc")


@pytest.mark.slow
def test_one_worker_and_one_seed_replay_a_child_exactly(killed_and_resumed):
    run = killed_and_resumed[0]
    store = RunStore(run)
    cfg = store.config()
    child = next(c for c in store.children() if c.ok and c.generation > 5)
    spec = ChildSpec(child.index, child.id, child.quality_task, child.parents, child.seed)
    parents = [store.genome_path(p).read_bytes() for p in child.parents]
    res = ChildWorker(cfg, threads=1).run(spec, parents)
    assert res.error is None
    from cycleqd.model.genome import Genome

    again, logged = Genome.from_bytes(res.genome), store.load_genome(child.id)
    assert torch.equal(again.a, logged.a) and torch.equal(again.d, logged.d)
    assert len(again.terms) == len(logged.terms)
    assert res.scores == pytest.approx(child.scores, abs=1e-9)


def _start(run_config: Path, run: Path, generations: int = 30, *where: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "cycleqd.cli", "-q", "evolve", "--config", str(run_config), "--run-dir", str(run),
         "--workers", "2", "--generations", str(generations), *where],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_children(proc: subprocess.Popen, run: Path, n: int) -> None:
    log = run / "children.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"run ended or stalled before {n} children: {proc.stderr.read()[-500:]}")


@pytest.mark.slow
@pytest.mark.parametrize("signum, where", [(signal.SIGTERM, ()), (signal.SIGINT, ("--in-process",))],
                         ids=["SIGTERM-on-ray", "SIGINT-in-process"])
def test_a_signal_stops_the_run_cleanly_and_it_resumes(signum, where, run_config, tmp_path):
    """SIGTERM and SIGINT alike, on Ray and in process: exit 1 with one line, nothing half-written, no
    second driver meanwhile; the run resumes the other way (in process <-> on Ray: one run folder)."""
    run = tmp_path / "run"
    proc = _start(run_config, run, 1000, *where)  # far more than can finish before the signal
    _wait_for_children(proc, run, 3)
    # one driver per run folder: a second one is refused while the first lives
    second = _cycleqd("resume", str(run))
    assert second.returncode == 2 and f"PID {proc.pid}" in second.stderr, second.stderr
    os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 1, err[-2000:]
    assert len(lines) == 1 and f"stopped by {signum.name}" in lines[0] and "cycleqd resume" in lines[0], err[-2000:]
    store = RunStore(run)
    children = store.children()  # every line whole
    assert len(children) >= 3 and [c.generation for c in children] == list(range(1, len(children) + 1))
    assert all(store.genome_path(c.id).is_file() for c in children if c.ok)
    check = _cycleqd("check", str(run))
    assert check.returncode == 0, check.stdout
    other = () if where else ("--in-process",)
    res = _cycleqd("resume", str(run), "--generations", str(len(children) + 2), *other)
    assert res.returncode == 0, res.stderr[-2000:]
    after = store.children()
    assert len(after) == len(children) + 2 and len({c.id for c in after}) == len(after)


def test_in_process_runs_without_ray(run_config, tmp_path):
    """--in-process: the CLI never imports Ray, and the run is whole; with --address it is refused (exit 2)."""
    from run_helpers import cli

    run = tmp_path / "run"
    code, ray, err = cli("evolve", "--config", str(run_config), "--run-dir", str(run), "--generations", "4",
                         "--in-process")
    assert code == 0 and not ray, err[-2000:]
    children = RunStore(run).children()
    assert [c.generation for c in children] == [1, 2, 3, 4] and all(c.ok for c in children)
    assert RunStore(run).final_merge()["scores"].keys() == set("abc")
    code, ray, err = cli("resume", str(run), "--generations", "6", "--in-process", "--address", "auto")
    assert code == 2 and len(err.splitlines()) == 1 and "--in-process" in err, err
    assert len(RunStore(run).children()) == 4
