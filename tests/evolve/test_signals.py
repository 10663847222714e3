"""A stop signal is not an error: library code's ``except Exception`` does not swallow it; a driver
stops when the process that started it ends (not under nohup); a second driver waits for a stopping one."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cycleqd.evolve.signals import RunInterrupted, StopSignals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_inside_a_broad_except_still_stops(signum: int) -> None:
    """Raised where the main thread is, e.g. inside a model loader's or a task's ``try/except Exception``."""
    swallowed = []
    # under nohup (a suite started that way) SIGHUP is ignored and left so; here it is not ignored
    outer = signal.signal(signum, signal.SIG_DFL) if signum == signal.SIGHUP else None
    try:
        with StopSignals(), pytest.raises(RunInterrupted) as e:
            try:
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the handler runs here, at the latest
            except Exception as err:  # noqa: BLE001 - what library code does
                swallowed.append(err)
        assert e.value.signum == signum and swallowed == []
        assert signal.getsignal(signum) is not StopSignals._handle  # the handlers are restored afterwards
    finally:
        if outer is not None:
            signal.signal(signum, outer)


# A driver's signal handling as the CLI sets it up, holding a run folder's lock: it writes "ready",
# then waits (with "busy", first 2 s in which no handler can run, as in a long call into a library);
# a stop prints the signal's name, holds on for a second (a Ray cluster shutting down) and lets go.
DRIVER = """
import signal, sys, time
from cycleqd.evolve.signals import RunInterrupted, StopSignals, note_parent
from cycleqd.runs.lock import RunLock
note_parent()
with RunLock(sys.argv[1]):
    try:
        with StopSignals() as stop:
            stop.polling = True
            if sys.argv[2] == "busy":
                signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGHUP])
            print("ready", flush=True)
            if sys.argv[2] == "busy":
                time.sleep(2)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGHUP])
            while stop.signum is None:
                time.sleep(0.05)
            time.sleep(1.0)
            raise RunInterrupted(stop.signum)
    except RunInterrupted as e:
        print(f"stopped by {e.signum}", flush=True)
"""


def _wrapped_driver(folder: Path, nohup: bool, busy: bool = False) -> tuple[subprocess.Popen, int]:
    """The driver started by ``timeout`` (as a check or a job script does), optionally under nohup;
    returns the wrapper and the driver's PID."""
    cmd = ["timeout", "300", *(["nohup"] if nohup else []), sys.executable, "-c", DRIVER, str(folder),
           "busy" if busy else "idle"]
    wrapper = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert wrapper.stdout.readline() == "ready\n"
    kids = Path(f"/proc/{wrapper.pid}/task/{wrapper.pid}/children").read_text().split()
    return wrapper, int(kids[0])


def _kill_if_left(pid: int) -> None:
    """Kill the driver if a failed test left it running (only while the number is still that driver's)."""
    try:
        if b"note_parent()" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


@pytest.mark.skipif(shutil.which("timeout") is None, reason="coreutils' timeout missing")
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_a_driver_stops_when_its_starter_is_killed_and_a_resume_waits_for_it(tmp_path: Path, busy: bool) -> None:
    """SIGKILL to the process that started the driver (it cannot pass anything on): the kernel sends the
    driver SIGHUP, it stops cleanly, and a second driver started at that moment waits for the folder
    instead of refusing it, also while the first has not yet had a moment to handle the signal."""
    from cycleqd.runs.lock import RunLock

    wrapper, driver = _wrapped_driver(tmp_path, nohup=False, busy=busy)
    try:
        wrapper.kill()
        wrapper.wait()
        start = time.monotonic()
        with RunLock(tmp_path):  # would raise RunLocked without the wait
            waited = time.monotonic() - start
        assert 0.5 < waited < 60, waited  # the stopping driver's last second was waited for
        assert wrapper.stdout.read() == f"stopped by {int(signal.SIGHUP)}\n"
    finally:
        _kill_if_left(driver)


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("nohup") is None, reason="coreutils missing")
def test_under_nohup_a_driver_outlives_its_starter_and_a_second_driver_is_refused(tmp_path: Path) -> None:
    """nohup (SIGHUP ignored): the driver runs on when its starter dies, and a second driver is refused
    naming the running one."""
    from cycleqd.runs.lock import RunLock, RunLocked

    wrapper, driver = _wrapped_driver(tmp_path, nohup=True)
    try:
        wrapper.kill()
        wrapper.wait()
        time.sleep(0.5)  # a stop, had there been one, would have begun
        with pytest.raises(RunLocked, match=f"is running on this run folder \\(PID {driver}\\)"):
            RunLock(tmp_path).acquire()
        os.kill(driver, 0)  # still there
        os.kill(driver, signal.SIGTERM)
        assert wrapper.stdout.read() == f"stopped by {int(signal.SIGTERM)}\n"
    finally:
        _kill_if_left(driver)


def test_a_library_caller_is_not_tied_to_its_parent() -> None:
    """Without the CLI's note of the parent, StopSignals asks the kernel for nothing: a program that
    calls the library keeps its own relation to its parent."""
    code = ("import ctypes, signal\nfrom cycleqd.evolve.signals import StopSignals\n"
            "with StopSignals():\n    v = ctypes.c_int(-1)\n"
            "    ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0)\n    print(v.value)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "0", out.stderr
