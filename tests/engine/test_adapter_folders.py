"""An engine's adapter scratch folder goes with the engine, and one left by a killed process is swept."""
from __future__ import annotations

import gc
import subprocess
import sys

from cycleqd.engine.adapter_folders import PREFIX, AdapterFolders, sweep_stale


class _Owner:
    pass


def test_folder_removed_with_its_owner_and_on_close():
    """Collecting the owner removes the folder; close() removes it at once."""
    owner = _Owner()
    folders = AdapterFolders(owner)
    folders.path("c0").mkdir()
    (folders.path("c0") / "adapter_model.safetensors").write_bytes(b"x")
    root = folders.root
    assert root.name.startswith(PREFIX) and root.is_dir()
    del owner
    gc.collect()
    assert not root.exists()
    other = _Owner()
    again = AdapterFolders(other)
    again.close()
    assert not again.root.exists()


def test_a_killed_process_folder_is_swept(tmp_path):
    """A folder named for a process that no longer exists is removed; a live process's is kept."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{PREFIX}{int(dead.stdout)}-abc"
    live = tmp_path / f"{PREFIX}{__import__('os').getpid()}-def"
    for p in (stale, live):
        (p / "c0").mkdir(parents=True)
    assert sweep_stale(tmp_path) == [stale]
    assert not stale.exists() and live.is_dir()
