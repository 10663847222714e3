"""Growing a run K -> K+1: exact genomes, kept scores, staged switch that survives SIGKILL, CVT at K = 4."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import make_tiny_family

from cycleqd.config import parse_config
from cycleqd.runs.history import run_history
from cycleqd.runs.lock import LOCK_NAME
from cycleqd.runs.store import RunStore
from cycleqd.search.archive import Archive

TEXTS = {
    "a": ["def add(a, b): return a + b", "for i in range(3): print(i)"],
    "b": ["select name from people where age > 30;", "select count(*) from t;"],
    "c": ["ls -la /tmp | wc -l", "grep -c foo a.txt"],
    "d": ["^ab[0-9]+$", "(cat|dog)s?"],
}
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _cycleqd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cycleqd.cli", "-q", *args], capture_output=True, text=True,
                          env=ENV, timeout=600)


def _show(run: Path) -> dict:
    out = _cycleqd("show", str(run), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny 4-expert family; a 3-task config (a, b, c) and grow specs adding d (grid, and CVT)."""
    d = tmp_path_factory.mktemp("growworld")
    fam = make_tiny_family(d / "family", tasks=tuple(TEXTS))
    tasks = []
    for t, lines in TEXTS.items():
        (d / f"{t}.txt").write_text("\n".join(lines) + "\n")
        tasks.append({"name": t, "kind": "likelihood", "data": str(d / f"{t}.txt")})
    full = {
        "name": "tinygrow", "seed": 0,
        "models": {"base": str(fam["base"]), "experts": {t: str(fam[t]) for t in TEXTS}},
        "tasks": tasks,
        "evolution": {"generations": 8, "workers": 2, "final_merge": True,
                      "mutation": {"name": "svd", "rate": 0.1, "rank": 8}},
        "engine": {"name": "transformers", "device": "cpu"},
        "prepare_cache": str(d / "cache"),
    }
    from cycleqd.evolve.worker import ChildWorker
    from cycleqd.model.genome import Genome

    worker = ChildWorker(parse_config(full), threads=1)  # bins around the seed experts' scores
    scores = [worker.evaluate(Genome.seed(k, worker.factors))[0] for k in range(4)]
    for t in tasks:
        vals = [s[t["name"]] for s in scores]
        lo, hi = min(vals), max(vals)
        t["bins"] = {"lo": max(0.0, lo - (hi - lo)), "hi": min(1.0, hi + (hi - lo)), "count": 5}
    three = {**full, "tasks": tasks[:3], "models": {**full["models"], "experts": {t: str(fam[t]) for t in "abc"}}}
    (d / "three.yaml").write_text(yaml.safe_dump(three))
    spec = {"task": tasks[3], "expert": str(fam["d"])}
    (d / "grow_d.yaml").write_text(yaml.safe_dump(spec))
    (d / "grow_d_cvt.yaml").write_text(yaml.safe_dump({**spec, "archive": {"kind": "cvt", "cells": 12, "seed": 1}}))
    return {"dir": d, "three": d / "three.yaml", "spec": d / "grow_d.yaml", "cvt": d / "grow_d_cvt.yaml",
            "cfg3": parse_config(three), "cfg4": parse_config(full)}


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory) -> dict:
    """A 3-task run of 8 children; copies of it; one copy grown by d (show before / after)."""
    root = tmp_path_factory.mktemp("growruns")
    run = root / "run"
    out = _cycleqd("evolve", "--config", str(world["three"]), "--run-dir", str(run), "--in-process")
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("kill", "cvt", "bad", "switch", "term"):
        shutil.copytree(run, root / name)
    before = _show(run)
    files_before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    out = _cycleqd("grow", str(run), "--task", str(world["spec"]))
    assert out.returncode == 0, out.stderr[-2000:]
    return {"root": root, "run": run, "before": before, "after": _show(run), "files_before": files_before}


def test_widened_genome_materialises_to_exactly_the_same_weights(world):
    from cycleqd.evolve.grow import widen_genome
    from cycleqd.evolve.worker import make_child
    from cycleqd.model.factors import Factors
    from cycleqd.model.genome import Genome, NoiseTerm, materialize
    from cycleqd.search.child import ChildSpec

    f3, f4 = Factors.prepare(world["cfg3"], progress=False), Factors.prepare(world["cfg4"], progress=False)
    seeds = [Genome.seed(k, f3) for k in range(3)]
    child, _ = make_child(ChildSpec(0, "g1", "b", ("seed_a", "seed_b"), 7), seeds[:2], world["cfg3"], f3)
    # a stored term too: terms keep their per-tensor coefficients when growing
    noisy = child.with_term(NoiseTerm(seed=3, std=1e-3, coef=torch.full((f3.num_tensors,), 0.5)))
    for g in (seeds[2], child, noisy):
        assert bool(g.d.ne(0).any()) or g is seeds[2]
        grown = widen_genome(g, f3, f4)
        assert grown.layout == f4.layout and grown.a.shape == (f4.num_tensors, 4)
        assert not bool(grown.a[:, 3].any()) and grown.d.shape == (f4.d_size,)
        before, after = materialize(g, f3), materialize(grown, f4)
        assert before.keys() == after.keys()
        for name in before:
            assert torch.equal(before[name], after[name]), name  # bit for bit, not approximately
    with pytest.raises(ValueError):
        widen_genome(widen_genome(child, f3, f4), f3, f4)  # a K+1 genome is not a genome of the K factors


@pytest.mark.slow
def test_grow_keeps_earlier_scores_and_adds_the_new_task(runs, world):
    before, after, run = runs["before"], runs["after"], runs["run"]
    assert before["tasks"] == ["a", "b", "c"] and after["tasks"] == ["a", "b", "c", "d"]
    assert after["generation"] == before["generation"] == 8
    now = {e["genome"]: e for a in after["archives"].values() for e in a["elites"]}
    earlier = {e["genome"]: e for a in before["archives"].values() for e in a["elites"]}
    for gid, e in earlier.items():
        if gid in now:
            assert {t: now[gid]["scores"][t] for t in "abc"} == e["scores"]  # exactly the logged scores
            assert "d" in now[gid]["scores"]
    assert len(set(earlier) & set(now)) >= 3
    store = RunStore(run)
    seeds = store.seeds()
    assert list(seeds) == ["a", "b", "c", "d"] and all(set(s["scores"]) == set("abcd") for s in seeds.values())
    assert "seed_d" in now  # the new expert is an elite of some archive (it is the best at d)
    cfg = store.config()
    assert cfg.task_names == list("abcd") and cfg.models.experts["d"] == world["cfg4"].models.experts["d"]
    assert set(store.models()) == {"base", "expert_a", "expert_b", "expert_c", "expert_d"}
    assert {k: store.models()[k] for k in json.loads(runs["files_before"]["models.json"])} == \
        json.loads(runs["files_before"]["models.json"])
    growth = [json.loads(x) for x in (run / "growth.jsonl").read_text().splitlines()]
    assert len(growth) == 1 and growth[0]["task"] == "d" and growth[0]["generation"] == 8
    assert set(growth[0]["scores"]) >= set(earlier)  # every elite was scored on d
    # the archives are the replay of the log, so a resume rebuilds exactly what grow wrote
    replayed = Archive.replay(cfg.task_names, {t.name: t.bins for t in cfg.tasks}, run_history(store), cfg.archive)
    assert replayed.to_json(8) == store.archives()
    assert not (run / ".grow").exists() and not (run / "final_merge.json").exists()
    # every genome of the run now has the grown layout
    from cycleqd.model.factors import Factors
    from cycleqd.model.genome import Genome

    f4 = Factors.prepare(world["cfg4"], progress=False)
    for p in (run / "genomes").glob("*.safetensors"):
        Genome.load(p).check(f4)


@pytest.mark.slow
def test_resume_after_grow_continues_with_four_rotating_tasks_and_survives_sigkill(runs):
    run = runs["run"]
    proc = subprocess.Popen([sys.executable, "-m", "cycleqd.cli", "-q", "resume", str(run), "--generations", "14"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(RunStore(run).children()) < 10:
        time.sleep(0.1)
    assert proc.poll() is None, f"resume ended before the kill: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = _show(run)
    assert killed["tasks"] == list("abcd") and killed["generation"] >= 10
    out = _cycleqd("resume", str(run), "--generations", "14", "--in-process")
    assert out.returncode == 0, out.stderr[-2000:]
    after = _show(run)
    for task, arch in killed["archives"].items():  # the kill lost no elite
        kept = {tuple(e["cell"]): e["quality"] for e in after["archives"][task]["elites"]}
        for e in arch["elites"]:
            assert kept[tuple(e["cell"])] >= e["quality"] - 1e-12, f"{task}: cell {e['cell']} lost"
    assert after["generation"] == 14
    children = RunStore(run).children()
    assert len(children) == 14 and len({c.id for c in children}) == 14
    late = sorted((c for c in children if c.generation > 8), key=lambda c: c.generation)
    assert all(set(c.scores) == set("abcd") for c in late if c.error is None)
    assert {c.quality_task for c in late} == set("abcd")  # d takes its turn as the quality task
    # earlier elites that are still elites keep their scores
    grown = {e["genome"]: e["scores"] for a in runs["after"]["archives"].values() for e in a["elites"]}
    for a in after["archives"].values():
        for e in a["elites"]:
            if e["genome"] in grown:
                assert e["scores"] == grown[e["genome"]]
    assert set(RunStore(run).final_merge()["scores"]) == set("abcd")


@pytest.mark.slow
def test_sigkill_during_grow_leaves_the_run_as_it_was_then_grows(runs, world):
    run = runs["root"] / "kill"
    config_before = (run / "config.yaml").read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "cycleqd.cli", "-q", "grow", str(run), "--task",
                             str(world["spec"])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (run / ".grow" / "genomes").exists():
        time.sleep(0.05)
    assert proc.poll() is None, f"grow ended before the kill: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # killed while staging: the run itself is untouched, the stage is discarded by the next command
    assert (run / "config.yaml").read_bytes() == config_before
    assert _show(run)["tasks"] == ["a", "b", "c"]
    out = _cycleqd("grow", str(run), "--task", str(world["spec"]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert not (run / ".grow").exists()
    # the same growth as the run grown without a kill
    assert json.loads((run / "growth.jsonl").read_text())["scores"] == \
        json.loads((runs["run"] / "growth.jsonl").read_text().splitlines()[0])["scores"]
    assert _show(run) == runs["after"]


def _wait(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def _feed_fifo(fifo: Path, src: Path) -> None:
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: nobody is reading
    except OSError:
        return
    with os.fdopen(fd, "wb") as f:
        f.write(src.read_bytes())


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_sigterm_during_grow_is_one_line_and_the_run_stays_as_it_was(runs, world, sig):
    """A real SIGTERM to a real grow while it stages: exit 1 with one line naming the run, the run's own
    files untouched; the staging is left to the next start, which discards it (as after a SIGKILL)."""
    from cycleqd.evolve.grow import finish_staged_growth

    run = runs["root"] / "term"
    state = lambda: {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != LOCK_NAME}  # noqa: E731
    before = state()
    # Task d reads its texts from a FIFO, which grow first opens once the genomes are staged: the open
    # holds grow inside its staging until this test has signalled it (no race with a fast grow).
    fifo = world["dir"] / "d_held.fifo"
    os.mkfifo(fifo)
    spec = world["dir"] / "grow_d_held.yaml"
    held = yaml.safe_load(world["spec"].read_text())
    spec.write_text(yaml.safe_dump({**held, "task": {**held["task"], "data": str(fifo)}}))
    proc = subprocess.Popen([sys.executable, "-m", "cycleqd.cli", "-q", "grow", str(run), "--task", str(spec)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (run / ".grow" / "genomes").exists():
            time.sleep(0.05)
        assert proc.poll() is None, f"grow ended before the signal: {proc.stderr.read()[-500:]}"
        assert (run / ".grow" / "genomes").exists(), "grow did not stage its genomes in 300 s"
        os.kill(proc.pid, sig)
    finally:
        if proc.poll() is None and not _wait(proc, 60):  # a grow that ignored the signal: let it read, then end it
            _feed_fifo(fifo, world["dir"] / "d.txt")
            proc.kill()
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip() and "it/s]" not in ln]
    assert proc.returncode == 1 and len(lines) == 1, err[-2000:]
    assert f"stopped by {sig.name}" in lines[0] and str(run) in lines[0], lines
    assert state() == before  # the run is as it was
    assert _show(run)["tasks"] == ["a", "b", "c"]
    assert finish_staged_growth(run) in ("discarded", None) and not (run / ".grow").exists()


def test_a_switch_killed_after_ready_is_finished(runs, world):
    from cycleqd.evolve.grow import READY, finish_staged_growth

    run, done = runs["root"] / "switch", runs["root"] / "kill"  # "kill" is grown by the test above, or now
    if len(RunStore(done).config().task_names) == 3:
        assert _cycleqd("grow", str(done), "--task", str(world["spec"])).returncode == 0
    # stage exactly what grow stages, mark it READY, and die after the first rename of the switch
    stage = run / ".grow"
    stage.mkdir()
    shutil.copytree(done / "genomes", stage / "genomes")
    for name in ("config.yaml", "models.json", "seeds.json", "growth.jsonl", "archives.json", "stats.jsonl"):
        shutil.copy(done / name, stage / name)
    (stage / READY).write_text("{}")
    os.rename(run / "genomes", stage / "genomes.old")
    assert finish_staged_growth(run) == "finished"
    assert finish_staged_growth(run) is None
    for name in ("config.yaml", "seeds.json", "growth.jsonl", "archives.json"):
        assert (run / name).read_bytes() == (done / name).read_bytes(), name
    assert sorted(p.name for p in (run / "genomes").iterdir()) == sorted(p.name for p in (done / "genomes").iterdir())
    assert not (run / "final_merge.json").exists()


def test_bad_grow_input_exits_2_and_writes_nothing(runs, world):
    run = runs["root"] / "bad"
    # the run's state, not the lock file (which holds the PID of whoever last held the lock)
    state = lambda: {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != LOCK_NAME}  # noqa: E731
    snapshot = state()
    again = world["dir"] / "grow_again.yaml"
    again.write_text(yaml.safe_dump({**yaml.safe_load(world["spec"].read_text()),
                                     "task": {"name": "b", "kind": "likelihood", "data": str(world["dir"] / "b.txt")}}))
    typo = world["dir"] / "grow_typo.yaml"
    typo.write_text(yaml.safe_dump({**yaml.safe_load(world["spec"].read_text()), "expertt": "x"}))
    for spec, message in ((again, "already has a task 'b'"), (typo, "expertt"),
                          (world["dir"] / "missing.yaml", "not found")):
        out = _cycleqd("grow", str(run), "--task", str(spec))
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert state() == snapshot
    assert not (run / ".grow").exists()


@pytest.mark.slow
def test_k4_run_on_cvt_end_to_end_with_heatmaps(runs, world):
    run = runs["root"] / "cvt"
    out = _cycleqd("grow", str(run), "--task", str(world["cvt"]))
    assert out.returncode == 0, out.stderr[-2000:]
    out = _cycleqd("resume", str(run), "--generations", "11", "--in-process")
    assert out.returncode == 0, out.stderr[-2000:]
    snap = _show(run)
    assert snap["generation"] == 11 and snap["tasks"] == list("abcd")
    assert snap["archive"]["kind"] == "cvt" and len(snap["archive"]["centroids"]) == 12
    assert all(len(e["cell"]) == 1 and 0 <= e["cell"][0] < 12 for a in snap["archives"].values() for e in a["elites"])
    out = _cycleqd("heatmap", str(run), "--out", str(run / "maps"))
    assert out.returncode == 0, out.stderr[-2000:]
    pngs = sorted(p.name for p in (run / "maps").glob("*.png"))
    assert "heatmaps.png" in pngs and {f"heatmap_{t}.png" for t in "abcd"} <= set(pngs)
    assert all((run / "maps" / p).stat().st_size > 5000 for p in pngs)
