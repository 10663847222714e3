"""The scratch folder where an engine keeps the child adapters it serves, removed when the engine goes.

Engines load child adapters from PEFT folders (vLLM reads them again whenever an adapter
comes back into its cache), so each folder lives while its adapter is loaded. The folder
of all of them is ``$TMPDIR/cycleqd-adapters-<pid>-XXXX``: it is removed when the engine
is collected or the process exits, and one left by a process that was killed (SIGKILL
runs no exit hook) is removed by the next engine that makes one on this machine.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path

PREFIX = "cycleqd-adapters-"
_OWNED = re.compile(rf"^{PREFIX}(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove adapter folders whose process is gone (killed before its exit hook); returns them."""
    root = Path(root or tempfile.gettempdir())
    gone = []
    for p in root.glob(f"{PREFIX}*"):
        m = _OWNED.match(p.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


class AdapterFolders:
    """One engine's adapter folders: ``path(name)`` to write one, ``remove(name)``, and the whole
    scratch folder removed with its owner (``owner`` collected, :meth:`close`, or process exit)."""

    def __init__(self, owner: object):
        sweep_stale()
        self.root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        self._finalizer = weakref.finalize(owner, shutil.rmtree, str(self.root), True)

    def path(self, name: str) -> Path:
        """Where the adapter ``name`` is written (not created yet)."""
        return self.root / name

    def remove(self, name_or_path: str | os.PathLike) -> None:
        """Remove one adapter's folder (a name under :attr:`root`, or its path)."""
        p = Path(name_or_path)
        shutil.rmtree(p if p.is_absolute() else self.root / p, ignore_errors=True)

    def close(self) -> None:
        """Remove the scratch folder now."""
        self._finalizer()
