"""Group commit (evolution.fsync: batch): every write handed to the syncer is fsynced before drain()
returns, and a store committing through it writes the same folder, torn tails included."""
from __future__ import annotations

from cycleqd.runs.durable import Syncer


def test_syncer_fsyncs_every_path_then_stops(tmp_path):
    """drain() returns only once every queued path is fsynced (counted), in any number; close() ends the thread."""
    s = Syncer(max_pending=4)  # fewer slots than paths: add() waits for the thread (back-pressure)
    for i in range(20):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x" * 100)
        s.add(p)
    s.drain()
    assert s.synced == 20
    s.close()
    assert not s._thread.is_alive()


def test_fsync_path_of_a_missing_file_is_nothing(tmp_path):
    """A path gone before its turn (a folder moved aside by `check --repair`) is skipped, not an error."""
    s = Syncer()
    s.add(tmp_path / "gone")
    (tmp_path / "there").write_text("x")
    s.add(tmp_path / "there")
    s.drain()
    assert s.synced == 2
    s.close()

