"""SIGTERM and SIGINT, handled alike by every command that writes a run folder.

A driver (evolve, resume, grow, export) stops cleanly: what is finished stays on disk,
staging folders are removed or finished at the next start, and the CLI turns
:class:`RunInterrupted` into one line and exit 1.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any


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
    """SIGTERM and SIGINT, handled alike while a driver runs.

    Outside the steady-state loop a signal raises :class:`RunInterrupted` at once;
    inside it (``polling``) the first signal only sets ``signum`` so the loop stops
    asking at its next step, and a second one raises. Handlers are installed in the
    main thread only (elsewhere the signals keep their handlers).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.polling = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        """(Re)install the handlers: Ray installs its own SIGTERM handler on init, which exits mid-call."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s in self.SIGNALS:
            old = signal.signal(s, self._handle)
            self._old.setdefault(s, old)

    def _handle(self, signum: int, frame: object) -> None:
        first = self.signum is None
        self.signum = signum
        if not self.polling or not first:
            raise RunInterrupted(signum)

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def __enter__(self) -> "StopSignals":
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
