"""The cgroup module stops a group's processes at once (freezer) and ends every one of them."""
from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cycleqd.sandbox import bwrap_available, cgroups

# Appends a line to a file every 10 ms, and keeps starting children that do the same.
TICKER = """
import os, sys, time
path = sys.argv[1]
for i in range(3000):
    with open(path, "a") as f:
        f.write("t\\n")
    if i % 20 == 0 and os.fork() == 0:
        continue  # the child ticks too
    time.sleep(0.01)
"""


def _freezable_group() -> cgroups.Group | None:
    g = cgroups.make_group("cycleqd-probe", pids=256, freezer=True)
    if g is None or g.freeze(True) is False:
        if g is not None:
            g.remove()
        return None
    g.freeze(False)
    return g


def _size(p: Path) -> int:
    return p.stat().st_size if p.exists() else 0


def test_a_frozen_group_makes_no_progress_and_is_ended_whole(tmp_path: Path) -> None:
    """While frozen, no process of the group (children it forked included) writes a byte; thawed
    they run again; remove() kills every one of them and deletes the group's folders."""
    group = _freezable_group()
    if group is None:
        pytest.skip("this host lets no process create a freezer cgroup (not root, or no freezer / v2 group)")
    out = tmp_path / "ticks"
    proc = subprocess.Popen([sys.executable, "-c", TICKER, str(out)], preexec_fn=group.join)
    try:
        deadline = time.monotonic() + 10
        while len(group.pids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(group.pids()) >= 3, "the ticker and its children are in the group"
        assert group.freeze(True)
        frozen_at = _size(out)
        time.sleep(0.3)
        assert _size(out) == frozen_at, "a frozen process wrote"
        assert group.freeze(False)
        time.sleep(0.3)
        assert _size(out) > frozen_at, "thawed processes run again"
        pids = group.pids()
        group.remove()
        assert proc.wait(timeout=5) != 0
        time.sleep(0.05)
        assert not [p for p in pids if Path(f"/proc/{p}").exists()
                    and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]]
        assert not any(d.exists() for d in group.dirs.values())
    finally:
        proc.kill()
        proc.wait()
        group.remove()


def test_sweep_stale_removes_only_groups_whose_owner_is_gone() -> None:
    """Groups named for a process that is gone are killed and removed; one whose owner lives stays."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = cgroups.make_group("cycleqd-probe", pids=64, name=f"cycleqd-probe-{dead.pid}-0")
    mine = cgroups.make_group("cycleqd-probe", pids=64)
    if stale is None or mine is None:
        pytest.skip("this host lets no process create cgroups")
    try:
        removed = cgroups.sweep_stale("cycleqd-probe")
        assert stale.name in removed and mine.name not in removed
        assert not any(d.exists() for d in stale.dirs.values())
        assert all(d.exists() for d in mine.dirs.values())
        assert os.getpid() and cgroups.find(mine.name).dirs == mine.dirs
    finally:
        mine.remove()
        stale.remove()


def test_session_sweep_keeps_starting_episodes_and_removes_dead_ones() -> None:
    """A folder whose owner record is missing or half-written is a starting episode's while it
    is young (another thread is still writing it), so a sweep keeps it; one whose owner is gone
    goes, and so does an old one without a record."""
    from cycleqd.sandbox.os_env import _PREFIX, _session_places, sweep_stale_sessions
    place = _session_places()[0]
    dead = subprocess.Popen(["true"])
    dead.wait()
    folders = {name: Path(tempfile.mkdtemp(prefix=_PREFIX, dir=place)) for name in ("empty", "none", "dead", "old")}
    (folders["empty"] / "owner").write_text("")
    (folders["dead"] / "owner").write_text(f"{dead.pid} 1\n")
    os.utime(folders["old"], (time.time() - 3600, time.time() - 3600))
    try:
        removed = set(sweep_stale_sessions())
        assert {folders["dead"].name, folders["old"].name} <= removed
        assert folders["empty"].is_dir() and folders["none"].is_dir()
        assert not folders["dead"].exists() and not folders["old"].exists()
    finally:
        for f in folders.values():
            shutil.rmtree(f, ignore_errors=True)


@pytest.mark.skipif(not bwrap_available(), reason="bubblewrap (bwrap) missing or cannot start here")
def test_sessions_started_together_survive_each_others_sweeps() -> None:
    """Every session start sweeps; eight threads starting machines at once all get theirs."""
    from concurrent.futures import ThreadPoolExecutor

    from cycleqd.sandbox.os_env import OSSession

    def one(i: int) -> str:
        s = OSSession(memory_mb=256, disk_mb=64, image=None)
        try:
            return s.run(f"echo ok{i}", timeout=30).output.strip()
        finally:
            s.close()

    with ThreadPoolExecutor(8) as ex:
        assert list(ex.map(one, range(8))) == [f"ok{i}" for i in range(8)]


@pytest.mark.skipif(not bwrap_available(), reason="bubblewrap (bwrap) missing or cannot start here")
def test_the_machine_shell_and_checks_run_in_the_episodes_group_and_limits() -> None:
    """The machine's init, the agent's shell and a check script are each in the episode's cgroup (where
    the host has cgroups) and under its limits: address space, no core files, files up to 256 MB."""
    from cycleqd.sandbox.os_env import OSSession

    want = {"Max address space": 384 << 20, "Max core file size": 0, "Max file size": 256 << 20}

    def limits(text: str) -> dict[str, int]:
        out = {}
        for line in text.splitlines():
            for name in want:
                if line.startswith(name):
                    out[name] = int(line[len(name):].split()[0])  # the soft limit
        return out

    with OSSession(memory_mb=384, disk_mb=64, image=None) as s:
        assert limits(s.run("cat /proc/self/limits", timeout=30).output) == want
        assert limits(s.run_script("bash", "cat /proc/self/limits", [], timeout=30).output) == want
        probe = s.run_script("bash", "sleep 5 & echo $!; cat /proc/$!/limits", [], timeout=30).output
        assert limits(probe) == want
        if s.cgroup.dirs:  # the host gives the episode a group: every process of the machine is in it
            members = set(s.cgroup.pids())
            assert s._init_pid in members and s._shell_pid in members
            assert {p for p, _ in s._processes()} <= members



@pytest.mark.skipif(not bwrap_available(), reason="bubblewrap (bwrap) missing or cannot start here")
def test_a_stalled_shell_start_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shell that does not answer in time (a host too busy to run it) is killed and started once
    more. The stall: the episode's cgroup frozen once the machine runs, so the first shell joins it
    frozen; the kill of the first thaws the group, and the second answers."""
    from cycleqd.sandbox import os_env
    monkeypatch.setattr(os_env, "_SHELL_START_S", 1.5)
    start_machine = os_env.OSSession._start_machine

    def start_then_freeze(self: os_env.OSSession) -> None:
        start_machine(self)
        if not self.cgroup.freeze(True):
            pytest.skip("this host gives the episode no freezer")

    monkeypatch.setattr(os_env.OSSession, "_start_machine", start_then_freeze)
    with os_env.OSSession(memory_mb=256, disk_mb=64, image=None) as s:
        assert s.run("echo ok", timeout=30).output == "ok\n"
        assert s.timeouts == 1  # the first shell's start


@pytest.mark.skipif(not bwrap_available(), reason="bubblewrap (bwrap) missing or cannot start here")
def test_a_shell_that_cannot_start_is_reported_with_both_tries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no shell can start (here: the episode may start no further process), the error names
    what each of the two tries ended with, and the session is closed."""
    from cycleqd.sandbox import os_env
    from cycleqd.sandbox.backends import SandboxUnavailable
    start_machine = os_env.OSSession._start_machine

    def start_then_cap(self: os_env.OSSession) -> None:
        start_machine(self)
        pids = self.cgroup.dirs.get("pids")
        if pids is None or not (pids / "pids.max").exists():
            pytest.skip("this host gives the episode no process limit")
        (pids / "pids.max").write_text(str(len(self.cgroup.pids())))

    monkeypatch.setattr(os_env.OSSession, "_start_machine", start_then_cap)
    s = os_env.OSSession(memory_mb=256, disk_mb=64, image=None, launch=False)
    with pytest.raises(SandboxUnavailable, match="shell did not start") as err:
        s.launch()
    assert str(err.value).count("shell exit") == 2 and "then" in str(err.value), err.value
    assert not s.alive and s.proc.poll() is not None and not s.dir.exists()


def test_a_reaped_process_group_is_never_signalled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a process is reaped its number may be reused by any process: the session kills a
    group only while its leader is unreaped (then the number is still the leader's)."""
    from cycleqd.sandbox.os_env import _kill_group
    live = subprocess.Popen(["sleep", "30"], start_new_session=True)
    _kill_group(live)
    assert live.wait(timeout=10) == -signal.SIGKILL
    done = subprocess.Popen(["true"], start_new_session=True)
    done.wait()
    # a process that now has done's number, in a group of that number, stands for the reuse
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "killpg", lambda pgid, sig: calls.append((pgid, sig)))  # records; nothing may be sent
    _kill_group(done)
    assert calls == []
