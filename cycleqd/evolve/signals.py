"""SIGTERM, SIGINT and SIGHUP, handled alike by every command that writes a run folder.

A driver (evolve, resume, grow, export) stops cleanly: what is finished stays on disk,
staging folders are removed or finished at the next start, and the CLI turns
:class:`RunInterrupted` into one line and exit 1.

A driver started from the command line also stops when the process that started it ends
(a ``timeout`` or a job script killed, a terminal closed): the kernel sends it SIGHUP then
(``PR_SET_PDEATHSIG``). Under ``nohup`` SIGHUP is ignored and the driver runs on; so does one
whose parent was gone before it started (``setsid``).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1
_parent: int | None = None  # the CLI's parent at start; None in a library caller's process


def note_parent() -> None:
    """Called first by the CLI: the process that started this one, whose end stops a driver."""
    global _parent
    _parent = os.getppid()


def _parent_death_signal(signum: int) -> bool:
    """Ask the kernel for ``signum`` when the parent ends (0: no longer); False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class RunInterrupted(BaseException):
    """The driver was stopped by a signal; everything finished is on disk and the run resumes.

    A ``BaseException``, as ``KeyboardInterrupt`` is: the handler raises it wherever the main
    thread is, and a task's or the worker's ``except Exception`` (a sample that fails, a bad
    child logged as failed) must not take the stop for an error and carry on.
    """

    def __init__(self, signum: int, run_dir: Path | None = None, generation: int | None = None):
        self.signum, self.run_dir, self.generation = signum, run_dir, generation
        name = signal.Signals(signum).name
        where = f" after {generation} children" if generation is not None else ""
        hint = f"; continue with `cycleqd resume {run_dir}`" if run_dir is not None else ""
        super().__init__(f"stopped by {name}{where}{hint}")


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP, handled alike while a driver runs.

    Outside the steady-state loop a signal raises :class:`RunInterrupted` at once;
    inside it (``polling``) the first signal only sets ``signum`` so the loop stops
    asking at its next step, and a second one raises. Handlers are installed in the
    main thread only (elsewhere the signals keep their handlers); an ignored SIGHUP
    (``nohup``) stays ignored. The first signal marks the run folders this process
    holds as stopping, so that a ``cycleqd resume`` started meanwhile waits for them.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.polling = False
        self._old: dict[int, Any] = {}
        self._armed = False

    def install(self) -> None:
        """(Re)install the handlers: Ray installs its own SIGTERM handler on init, which exits mid-call."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s in self.SIGNALS:
            if s == signal.SIGHUP and self._old.get(s, signal.getsignal(s)) == signal.SIG_IGN:
                continue  # nohup: the driver outlives its terminal and its parent
            old = signal.signal(s, self._handle)
            self._old.setdefault(s, old)
        if signal.SIGHUP in self._old and _parent is not None and not self._armed:
            self._armed = _parent_death_signal(signal.SIGHUP)
            if self._armed:
                from cycleqd.runs.lock import watch_parent

                watch_parent(_parent)
                if os.getppid() != _parent:  # it ended before the kernel was asked
                    os.kill(os.getpid(), signal.SIGHUP)

    def _handle(self, signum: int, frame: object) -> None:
        first = self.signum is None
        self.signum = signum
        if first:
            from cycleqd.runs.lock import mark_stopping

            mark_stopping()
        if not self.polling or not first:
            raise RunInterrupted(signum)

    def restore(self) -> None:
        if self._armed:
            from cycleqd.runs.lock import watch_parent

            _parent_death_signal(0)
            watch_parent(None)
            self._armed = False
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def __enter__(self) -> "StopSignals":
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
