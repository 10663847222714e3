"""Atomic, durable file writes: the one home of "write a temp file, fsync, rename".

Every file a run, a cache or an export writes whole goes through :func:`write_atomic`,
so a reader never sees half a file and a kill leaves the old file or the new one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)  # read the process umask without changing it


def write_atomic(path: Path, data: bytes | str, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename.

    With ``durable=False`` the temp file is not fsynced before the rename: a killed process
    still leaves the old file or the new one (the page cache outlives it), but a machine crash
    may not; the caller fsyncs the file later (see :mod:`cycleqd.runs.durable`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """fsync every file in ``path`` and the folder itself (before a folder is renamed into place)."""
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
