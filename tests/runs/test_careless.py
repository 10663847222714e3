"""A careless user's run folder: every case ends in exit 2 or a quarantine, one line names the file, nothing is lost.

Each test damages a private copy of a real finished run (8 children over tiny models) and goes
through the real CLI: deep and huge log lines, non-finite or out-of-range genome coefficients,
deeply nested genome metadata, an oversized (sparse) genome, folders that are not runs (no lock
left behind), SIGTERM during export, and numeric config limits past their bounds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
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
from run_helpers import SLOW_GENOME_COPY

from cycleqd.model.genome import Genome
from cycleqd.runs.folder import RunFolder

ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def cli(*argv: str) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr)."""
    from cycleqd.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(["-q", *argv])
    return code, out.getvalue(), err.getvalue().strip()


def cli_process(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cycleqd.cli", "-q", *argv], capture_output=True, text=True,
                          env=ENV, timeout=timeout)



def _files(run: Path) -> dict[str, bytes]:
    """Every file's bytes (but the lock's, which holds the last holder's PID)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _elite(run: Path) -> tuple[Path, list[str]]:
    """The genome file of the best child elite (not a seed expert) and the export flags that pick it."""
    snap = RunFolder(run).snapshot()
    task, e = max(((t, e) for t in snap.tasks for e in snap.archives[t]["elites"]
                   if not e["genome"].startswith("seed_")), key=lambda te: te[1]["quality"])
    return run / "genomes" / f"{e['genome']}.safetensors", ["--archive", task, "--cell", ",".join(map(str, e["cell"]))]


def _one_line(err: str, *needles: str) -> None:
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def _quarantined(run: Path, rel: str) -> Path:
    found = list((run / "quarantine").glob(f"*/{rel}"))
    assert len(found) == 1, sorted(str(p) for p in (run / "quarantine").rglob("*"))
    return found[0]


def _no_export(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*")), "a staging folder was left"


# -- deep and huge log lines ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["deep", "huge"])
def test_a_deep_or_huge_log_line_is_named_then_quarantined_and_the_run_resumes(run, bad):
    """A line of 100,000 '[' (or one over the size bound) in children.jsonl: show, resume and check name
    file and line (no RecursionError / MemoryError), --repair quarantines it and the run resumes."""
    log = run / "children.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    n = len(lines)
    junk = b"[" * 100_000 + b"\n" if bad == "deep" else b'{"x": "' + b"a" * (17 << 20) + b'"}\n'
    lines.insert(3, junk)
    log.write_bytes(b"".join(lines))
    before = _files(run)

    for argv in (["show", str(run)], ["show", str(run), "--json"], ["export", str(run), "--best", "mean",
                                                                    "--out", str(run.parent / "out")]):
        code, _, err = cli(*argv)
        assert code == 2, err
        _one_line(err, f"{log}:4", "--repair")
    out = cli_process("resume", str(run), "--generations", str(n + 2))
    assert out.returncode == 2, out.stderr[-2000:]
    _one_line(out.stderr.strip(), f"{log}:4")
    assert _files(run) == before  # refused, nothing written

    code, report, _ = cli("check", str(run))
    assert code == 1 and "children.jsonl:4" in report, report
    code, report, _ = cli("check", str(run), "--repair")
    assert code == 0 and "children.jsonl:4" in report, report
    assert junk in _quarantined(run, "children.jsonl").read_bytes()  # moved aside, never deleted
    assert [c.generation for c in RunFolder(run).children] == list(range(1, n + 1))  # every child kept
    assert cli("check", str(run))[0] == 0
    if bad == "deep":  # one real resume (in process: Ray is not what this checks) shows a repaired log drives on
        out = cli_process("resume", str(run), "--generations", str(n + 2), "--in-process")
        assert out.returncode == 0, out.stderr[-2000:]
        assert RunFolder(run).generation == n + 2


def _found_refused_quarantined(run: Path, g: Path, pick: list[str], tmp_path: Path) -> str:
    """``check`` names the damaged genome ``g``, ``export`` refuses it (exit 2, one line, nothing
    written), ``check --repair`` quarantines it; returns check's report."""
    code, report, _ = cli("check", str(run))
    assert code == 1 and f"genomes/{g.name}" in report, report
    code, _, err = cli("export", str(run), *pick, "--out", str(tmp_path / "out"))
    assert code == 2, err
    _one_line(err, str(g))
    _no_export(tmp_path)
    code, repaired, _ = cli("check", str(run), "--repair")
    assert code == 0, repaired
    assert _quarantined(run, f"genomes/{g.name}").is_file() and not g.exists()
    return report


# -- genome values -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_non_finite_or_out_of_range_coefficients_are_found_refused_and_quarantined(run, tmp_path, value):
    """NaN, inf or 1e30 in a child elite's coefficients: check finds it, export refuses it (exit 2 naming the
    genome, nothing written), --repair quarantines it and the folder checks clean."""
    g, pick = _elite(run)
    genome = Genome.load(g)
    a = genome.a.clone()
    a[0, 0] = value
    dataclasses.replace(genome, a=a).save(g)

    report = _found_refused_quarantined(run, g, pick, tmp_path)
    assert "non-finite" in report or "out of range" in report, report
    rec = next(c for c in RunFolder(run).children if c.id == g.stem)
    assert not rec.ok and "quarantined" in rec.error and RunFolder(run).parents[g.stem]  # lineage kept
    assert cli("check", str(run))[0] == 0


def test_export_refuses_a_model_whose_weights_are_not_finite(run, tmp_path):
    """Coefficients in range can still give infinite weights (here: a delta term holding inf, which the
    header-and-coefficient check at resume does not read): export checks each materialised weight before
    writing anything, and names the genome."""
    from cycleqd.model.factors import Factors
    from cycleqd.model.genome import DeltaTerm
    from cycleqd.runs.store import RunDamaged
    from cycleqd.views.export import _materialized_engine

    g, pick = _elite(run)
    store = RunFolder(run).store
    cfg = store.config()
    factors = Factors.prepare(cfg, progress=False)
    name = factors.names[0]
    term = DeltaTerm.create({name: torch.full(factors.shape(name), float("inf"))}, factors)
    Genome.load(g).with_term(term).save(g)
    with pytest.raises(RunDamaged, match="non-finite weight"):
        _materialized_engine(cfg, g, store.genome_shape())
    code, _, err = cli("export", str(run), *pick, "--out", str(tmp_path / "out"))
    assert code == 2, err
    _one_line(err, str(g), "non-finite")
    _no_export(tmp_path)


# -- deeply nested metadata, oversized genomes ---------------------------------------------------


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


@pytest.mark.parametrize("bad", ["nested_terms", "nested_metadata", "sparse_30g", "trailing", "wrong_shape"])
def test_nested_oversized_or_misshapen_genomes_are_found_refused_and_quarantined(run, tmp_path, bad):
    """200k-deep metadata (inside the terms string or as the metadata itself), a 30 GB sparse file with a
    valid header, trailing bytes, or a tensor not of the run's layout: check finds it, export refuses it with
    one line naming the file (no RecursionError or MemoryError), --repair quarantines it."""
    g, pick = _elite(run)
    if bad == "nested_terms":
        _rewrite_header(g, lambda h: h["__metadata__"].update(terms="[" * 200_000 + "]" * 200_000))
    elif bad == "nested_metadata":
        _rewrite_header(g, lambda h: h.update(__metadata__="DEEP"))
        raw = g.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        text = raw[8:8 + n].rstrip().replace(b'"DEEP"', b"[" * 200_000 + b"]" * 200_000)
        text += b" " * (-len(text) % 8)
        g.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    elif bad == "sparse_30g":
        os.truncate(g, 30 << 30)
    elif bad == "trailing":
        with open(g, "ab") as f:
            f.write(b"\0" * 64)
    else:  # an extra expert column: a genome of another run's layout
        genome = Genome.load(g)
        dataclasses.replace(genome, a=torch.zeros(genome.a.shape[0], genome.a.shape[1] + 1)).save(g)

    _found_refused_quarantined(run, g, pick, tmp_path)
    assert cli("check", str(run))[0] == 0


# -- folders that are not runs -------------------------------------------------------------------


def test_commands_on_a_folder_that_is_not_a_run_leave_no_lock(tmp_path):
    """An empty folder, one holding an experiment YAML as config.yaml, one with a broken config.yaml (and a
    genomes/ folder): resume, check, check --repair, grow, export exit 2 with one line and write nothing."""
    empty = tmp_path / "empty"
    empty.mkdir()
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    shutil.copy(Path(__file__).parents[2] / "experiments" / "mini.yaml", experiment / "config.yaml")
    broken = tmp_path / "broken"
    (broken / "genomes").mkdir(parents=True)
    (broken / "config.yaml").write_text("models: [\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("task: {name: d, kind: likelihood}\nexpert: /nonexistent\n")
    for folder in (empty, experiment, broken):
        before = sorted(p.name for p in folder.rglob("*"))
        for argv in (["check", str(folder)], ["check", str(folder), "--repair"], ["show", str(folder)],
                     ["export", str(folder), "--best", "mean", "--out", str(tmp_path / "out")],
                     ["grow", str(folder), "--task", str(spec)]):
            code, _, err = cli(*argv)
            assert code == 2, (argv, err)
            _one_line(err, str(folder))
        out = cli_process("resume", str(folder), timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        _one_line(out.stderr.strip(), str(folder))
        assert sorted(p.name for p in folder.rglob("*")) == before, folder  # no .lock, nothing
    assert not (tmp_path / "out").exists()


def test_a_lock_we_created_is_removed_when_we_refuse(run):
    """In a run folder without a lock file (copied without it), a resume refused for bad input removes
    the lock file it made; one that was there stays."""
    (run / ".lock").unlink()
    (run / "seeds.json").write_text("[" * 100_000)
    out = cli_process("resume", str(run), timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    _one_line(out.stderr.strip(), str(run / "seeds.json"))
    assert not (run / ".lock").exists()


# -- SIGTERM during export -----------------------------------------------------------------------



@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_during_export_removes_the_staging_folder(run, tmp_path, sig):
    """A real SIGTERM (or SIGINT) to a real export process while it writes its staging folder: one line,
    exit 1, no .out.* staging folder, no out, the run untouched. (The staging step is held open by a
    slowed copy, so the signal lands inside it every time.)"""
    before = _files(run)
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_GENOME_COPY, str(marker), "-q", "export", str(run), "--best",
                             "mean", "--out", str(tmp_path / "out")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert list(tmp_path.glob(".out.*"))  # the staging folder is there when the signal comes
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip() and "it/s]" not in ln]  # transformers' progress bars
    _one_line("\n".join(lines), f"stopped by {sig.name}", str(tmp_path / "out"))
    _no_export(tmp_path)
    assert _files(run) == before


# -- numeric config limits -----------------------------------------------------------------------


@pytest.mark.parametrize("path,value,needle", [
    (("sandbox", "timeout"), 1e308, "sandbox.timeout"),
    (("sandbox", "timeout"), float("inf"), "sandbox.timeout"),
    (("sandbox", "timeout"), 0, "sandbox.timeout"),
    (("sandbox", "memory_mb"), 99999999999, "sandbox.memory_mb"),
    (("sandbox", "memory_mb"), 1, "sandbox.memory_mb"),
    (("engine", "batch_size"), 10**12, "engine.batch_size"),
    (("engine", "max_new_tokens"), 10**12, "engine.max_new_tokens"),
    (("evolution", "workers"), 10**9, "evolution.workers"),
    (("evolution", "worker_cpus"), float("nan"), "evolution.worker_cpus"),
    (("evolution", "mutation", "std"), float("inf"), "evolution.mutation.std"),
    (("archive",), {"kind": "cvt", "cells": 10**12}, "archive.cells"),
    (("seed",), 2**70, "seed"),
    (("sandbox", "backend"), "subprocess", "sandbox: backend 'subprocess' runs model code on the host"),
])
def test_numeric_limits_past_their_bounds_are_bad_input(tmp_path, path, value, needle):
    """A timeout of 1e308 (or inf, or 0), memory_mb of 99999999999, and every other number that feeds an OS
    call or an allocation past its bound: exit 2, one line naming the setting, no run folder written."""
    cfg = yaml.safe_load((Path(__file__).parents[2] / "experiments" / "mini.yaml").read_text())
    node = cfg
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(cfg))
    code, _, err = cli("evolve", "--config", str(f), "--run-dir", str(tmp_path / "run"))
    assert code == 2, err
    _one_line(err, needle)
    assert not (tmp_path / "run").exists()
