"""The run folder explains itself: one driver (lock), archives rebuilt from the log, damage named, check --repair."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import cli as cli_process

from cycleqd.runs.folder import RunFolder
from cycleqd.runs.lock import RunLock, RunLocked


def cli(*argv: str) -> tuple[int, bool, str]:
    """The CLI in this process (fast); ``cli_process`` where a fresh process must show Ray never started."""
    import contextlib
    import io

    from cycleqd.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(["-q", *argv])
    return code, False, err.getvalue().strip()



def _show_json(run: Path) -> dict:
    import contextlib
    import io

    from cycleqd.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["show", str(run), "--json"]) == 0
    return json.loads(out.getvalue())


def _files(run: Path) -> dict[str, bytes]:
    """Every file's bytes, but the lock's (a refused driver may take and drop the lock)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# -- one driver per run folder ------------------------------------------------------------------


def test_a_second_driver_is_refused_naming_the_holder(run):
    before = _files(run)
    with RunLock(run):
        for argv in (["resume", str(run)], ["evolve", "--config", str(run / "config.yaml"), "--run-dir", str(run)]):
            code, ray, err = cli_process(*argv)
            assert code == 2 and len(err.splitlines()) == 1 and f"PID {os.getpid()}" in err, err
            assert not ray
        with pytest.raises(RunLocked, match=f"PID {os.getpid()}"):
            RunLock(run).acquire()  # another lock object: another driver, even in this process
        assert RunLock.holder(run) == os.getpid()
    assert RunLock.holder(run) is None
    assert _files(run) == before


def test_the_lock_goes_when_its_holder_dies(run):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from cycleqd.runs.lock import RunLock; "
                               f"RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert RunLock.holder(run) == holder.pid
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with RunLock(run):  # no stale lock: the kernel dropped it with the process
        assert RunLock.holder(run) == os.getpid()


# -- archives are a pure function of the seeds and the log --------------------------------------


def test_missing_or_stale_archives_are_rebuilt(run):
    want = _show_json(run)
    (run / "archives.json").unlink()
    assert _show_json(run) == want
    code, _, err = cli("show", str(run))
    assert code == 0 and "no archives" not in err
    # stale: a snapshot of generation 2 left beside a longer log
    folder = RunFolder(run)
    (run / "archives.json").write_text(json.dumps(folder.archive(2).to_json(2)))
    assert RunFolder(run).stale() == f"at generation 2, the log at {folder.generation}"
    assert _show_json(run) == want
    assert RunFolder(run).rebuild_archives() is not None and RunFolder(run).stale() is None


def test_an_earlier_generation_is_replayed_from_the_log(run):
    folder = RunFolder(run)
    zero, now = folder.snapshot(0), folder.snapshot()
    assert {e["genome"] for a in zero.archives.values() for e in a["elites"]} == set(zero.seeds)
    assert now.generation == folder.generation == len(folder.children)
    assert all(e["generation"] <= now.generation for a in now.archives.values() for e in a["elites"])


# -- damage is named, and check --repair leaves a folder that resumes ---------------------------


def test_a_bad_line_in_the_middle_of_the_log_is_named(run):
    log = run / "children.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    lines.insert(3, "garbage\n")
    log.write_text("".join(lines))
    before = _files(run)
    for argv in (["resume", str(run)], ["show", str(run)], ["show", str(run), "--json"]):
        code, ray, err = (cli_process if argv[0] == "resume" else cli)(*argv)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"{log}:4: not a JSON line" in err and "check" in err and not ray
    assert _files(run) == before  # nothing written

    code, _, _ = cli("check", str(run))
    assert code == 1
    out = subprocess.run([sys.executable, "-m", "cycleqd.cli", "check", str(run), "--repair"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "children.jsonl:4" in out.stdout, out.stdout + out.stderr
    kept = list((run / "quarantine").glob("*/children.jsonl"))
    assert len(kept) == 1 and "garbage" in kept[0].read_text()  # moved aside, never deleted
    folder = RunFolder(run)
    assert [c.generation for c in folder.children] == list(range(1, len(lines)))
    assert folder.stale() is None
    assert cli("check", str(run))[0] == 0


def test_a_truncated_elite_genome_is_caught_at_resume_start(run):
    folder = RunFolder(run)
    elite = next(e for e in folder.snapshot().archives["a"]["elites"] if not e["genome"].startswith("seed_"))
    g = run / "genomes" / f"{elite['genome']}.safetensors"
    g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    before = _files(run)
    code, ray, err = cli_process("resume", str(run), "--generations", str(folder.generation + 5))
    assert code == 2 and len(err.splitlines()) == 1 and str(g) in err and "truncated" in err, err
    assert not ray and _files(run) == before  # refused before any child was asked

    code, _, _ = cli("check", str(run), "--repair")
    assert code == 0
    repaired = RunFolder(run)
    rec = next(c for c in repaired.children if c.id == elite["genome"])
    assert not rec.ok and "quarantined" in rec.error
    assert elite["genome"] not in {e["genome"] for a in repaired.snapshot().archives.values() for e in a["elites"]}
    assert (next((run / "quarantine").iterdir()) / "genomes" / g.name).is_file()
    assert repaired.parents[elite["genome"]]  # its lineage is kept


def test_export_names_a_bad_genome_file(run, tmp_path):
    best = RunFolder(run).best_by_mean()[0]["genome"]
    g = run / "genomes" / f"{best}.safetensors"
    g.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}!!!")
    code, _, err = cli("export", str(run), "--best", "mean", "--out", str(tmp_path / "out"))
    assert code == 2 and str(g) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_repaired_folder_resumes(run):
    """Deleted archives, a garbage log line and a killed writer's temp file: repair, then resume for real."""
    (run / "archives.json").unlink()
    with open(run / "children.jsonl", "a") as f:
        f.write('{"generation": 99}\n')
    (run / ".stats.jsonl.x.tmp").write_text("half")
    assert cli("check", str(run), "--repair")[0] == 0
    n = RunFolder(run).generation
    t0 = time.time()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-m", "cycleqd.cli", "-q", "resume", str(run), "--generations", str(n + 2),
                          "--in-process"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    folder = RunFolder(run)
    assert folder.generation == n + 2 and folder.stale() is None, time.time() - t0
    assert len({c.id for c in folder.children}) == n + 2


def test_lost_seeds_are_explained_not_shown_as_empty(run):
    (run / "seeds.json").unlink()
    code, _, err = cli("show", str(run), "--json")
    assert code == 2 and "seeds.json: missing while children.jsonl holds" in err and "resume" in err, err
    code, _, _ = cli("check", str(run))
    assert code == 1


def test_check_reports_a_clean_folder_and_a_torn_tail_as_harmless(run):
    from cycleqd.runs.check import check_run

    clean = check_run(run)
    assert clean.ok and not clean.findings and clean.generation == RunFolder(run).generation
    with open(run / "children.jsonl", "a") as f:
        f.write('{"generation": 99, "id": "g0')  # a writer SIGKILLed mid-line
    torn = check_run(run)
    assert torn.ok and "torn last line" in torn.notes[0]
    with RunLock(run), pytest.raises(RunLocked):
        check_run(run, repair=True)  # never repairs under a live driver


def test_a_bad_seed_expert_genome_is_moved_aside_and_the_seeds_evaluated_again(run):
    from cycleqd.runs.check import check_run

    g = run / "genomes" / "seed_b.safetensors"
    g.write_bytes(b"")
    report = check_run(run)
    assert not report.ok and any(f.file == "genomes/seed_b.safetensors" for f in report.findings)
    assert check_run(run, repair=True).ok
    assert set(RunFolder(run).seeds) == {"a", "c"} and not g.exists()
    assert list((run / "quarantine").glob("*/genomes/seed_b.safetensors"))
    assert not (run / "archives.json").exists()  # rebuilt once the seed experts are evaluated again
