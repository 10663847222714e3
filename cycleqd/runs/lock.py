"""One driver per run folder: an exclusive lock held for the driver's whole life.

The lock is ``fcntl.flock`` on ``RUN/.lock``; the kernel drops it when the
process dies however it dies (SIGKILL included), so a stale lock never blocks a
resume. The file holds the holder's PID, which a refused second driver names; the
parent whose end stops the holder (a CLI driver, see :mod:`cycleqd.evolve.signals`); and
``stopping`` once a signal stopped it. A second driver waits for a holder that is stopping
or whose parent is gone (a resume started right after a driver's wrapper was killed)
instead of refusing it.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from cycleqd.config import ConfigError
from cycleqd.runs.layout import LOCK as LOCK_NAME  # noqa: E402


#: Seconds a second driver waits for a stopping holder to let go (its Ray cluster shuts down).
STOPPING_WAIT_S = 120.0
_held: set[int] = set()  # descriptors of the locks this process holds


class RunLocked(ConfigError):
    """Another live driver holds the run folder (bad input: exit 2)."""


def _locked(run_dir: Path, pid: object, stopping: bool = False) -> RunLocked:
    if stopping:
        return RunLocked(f"{run_dir}: the cycleqd driver on this run folder (PID {pid}) is stopping but has "
                         f"not let go after {STOPPING_WAIT_S:.0f} s; try again once it has ended")
    return RunLocked(f"{run_dir}: another cycleqd driver is running on this run folder "
                     f"(PID {pid}); wait for it or stop it first")


def _write(fd: int, *words: str) -> None:
    """The lock file's one record: the holder's PID and what it says of itself, at a fixed width
    (a reader never sees a shorter record over a longer one's tail)."""
    os.pwrite(fd, " ".join((str(os.getpid()), *words)).ljust(63).encode()[:63] + b"\n", 0)


def _record(fd: int) -> tuple[int | None, bool]:
    """(PID, stopping) as the lock file ``fd`` says: stopping once the holder said so, or once the
    parent whose end stops it (see :func:`watch_parent`) is no longer its parent."""
    words = os.pread(fd, 64, 0).decode(errors="replace").split()
    pid = int(words[0]) if words and words[0].isdigit() else None
    stopping = "stopping" in words[1:]
    parent = next((w.removeprefix("parent=") for w in words[1:] if w.startswith("parent=")), None)
    if pid is not None and parent is not None and not stopping:
        try:  # /proc/PID/stat: "pid (comm) state ppid ...", comm may hold spaces and parentheses
            ppid = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1]
        except (OSError, IndexError):
            ppid = None  # ended: its lock is about to go
        stopping = ppid != parent
    return pid, stopping


def watch_parent(parent: int | None) -> None:
    """Say in every lock this process holds that it stops when ``parent`` ends (a second driver
    then waits for it from the moment it is orphaned, before its handler has run); None: no more."""
    for fd in list(_held):
        try:
            _write(fd, *([f"parent={parent}"] if parent is not None else []))
        except OSError:
            pass


def mark_stopping() -> None:
    """Say in every lock this process holds that its driver is stopping (a signal's first step)."""
    for fd in list(_held):
        try:
            _write(fd, "stopping")
        except OSError:
            pass


def _wait_unless_running(fd: int) -> tuple[bool, int | None, bool]:
    """With the lock file ``fd`` held by another process: wait while its holder stops.

    Returns (free, pid, stopping): free once the holder let go (nothing taken); else the
    holder's PID and whether it is stopping. A running holder is refused at once; a stopping
    one gets :data:`STOPPING_WAIT_S` to end.
    """
    start = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, stopping = _record(fd)
            if not stopping or time.monotonic() - start >= STOPPING_WAIT_S:
                return False, pid, stopping
            time.sleep(0.1)
            continue
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True, None, False


class RunLock:
    """The exclusive lock on one run folder.

    Args:
        run_dir: the run folder (must exist).

    Use as a context manager or call :meth:`acquire` / :meth:`release`. The
    descriptor is close-on-exec, so Ray's processes never inherit the lock.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self.created = False  # whether acquire() made the lock file (then a refusal removes it)

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunLocked naming the holder's PID. Re-entrant in one process."""
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            self.created = True
        except FileExistsError:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self.created = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                free, pid, stopping = _wait_unless_running(fd)
                if not free:
                    os.close(fd)
                    raise _locked(self.path.parent, pid or "unknown", stopping) from None
        os.ftruncate(fd, 0)
        _write(fd)
        self._fd = fd
        _held.add(fd)
        return self

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (the file stays; an unlocked file means no driver)."""
        if self._fd is not None:
            _held.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def refuse_if_held(run_dir: str | os.PathLike) -> None:
        """Raise RunLocked naming the PID if a live driver holds ``run_dir``, after waiting for
        one that is stopping (takes nothing)."""
        try:
            fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            free, pid, stopping = _wait_unless_running(fd)
        finally:
            os.close(fd)
        if not free:
            raise _locked(Path(run_dir), pid or "unknown", stopping)

    @staticmethod
    def holder(run_dir: str | os.PathLike) -> int | None:
        """PID of the live driver holding ``run_dir``, or None (no lock file, or nobody holds it)."""
        path = Path(run_dir) / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, _ = _record(fd)
                return pid if pid is not None else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        # bad input refused under the lock writes nothing, so not even a lock file of ours stays
        if exc_type is not None and issubclass(exc_type, ConfigError) and self.created and self._fd is not None:
            self.path.unlink(missing_ok=True)  # still held: nobody else can be using this file
        self.release()
