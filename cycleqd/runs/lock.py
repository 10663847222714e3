"""One driver per run folder: an exclusive lock held for the driver's whole life.

The lock is ``fcntl.flock`` on ``RUN/.lock``; the kernel drops it when the
process dies however it dies (SIGKILL included), so a stale lock never blocks a
resume. The file holds the holder's PID, which a refused second driver names.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cycleqd.config import ConfigError
from cycleqd.runs.layout import LOCK as LOCK_NAME  # noqa: E402


class RunLocked(ConfigError):
    """Another live driver holds the run folder (bad input: exit 2)."""


def _locked(run_dir: Path, pid: object) -> RunLocked:
    return RunLocked(f"{run_dir}: another cycleqd driver is running on this run folder "
                     f"(PID {pid}); wait for it or stop it first")


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
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise _locked(self.path.parent, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (the file stays; an unlocked file means no driver)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def refuse_if_held(run_dir: str | os.PathLike) -> None:
        """Raise RunLocked naming the PID if a live driver holds ``run_dir`` (takes nothing)."""
        pid = RunLock.holder(run_dir)
        if pid is not None:
            raise _locked(Path(run_dir), pid if pid >= 0 else "unknown")

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
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
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
