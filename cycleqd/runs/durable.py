"""Group commit of a run folder's writes: fsync in a background thread, off the driver's path.

A finished child is written (genome file renamed into place, then its log line appended)
before the next child is asked, in the write-ahead order of :meth:`RunStore.commit
<cycleqd.runs.store.RunStore.commit>`. Those writes are in the operating system's page cache the
moment they return, so a driver killed at any moment (SIGKILL, OOM, a crash of the process)
loses nothing: the kernel still writes them out. Only a crash of the *machine* (power loss,
kernel panic) can lose writes that were never fsynced.

``evolution.fsync`` chooses when that happens:

* ``batch`` (the default): the driver writes without waiting and hands each path to a
  :class:`Syncer`, a thread that fsyncs them in order (genome files before the log), in groups;
  the driver waits only when more than ``MAX_PENDING`` files are queued, and at the end of a run
  or on a stop (:meth:`Syncer.drain`). A machine crash can lose the children finished in the last
  moments (those still queued, at most ``MAX_PENDING`` files), and, because the kernel may
  write the log before a genome, can leave a log line whose genome is missing or cut:
  ``cycleqd check RUN --repair`` marks such a child failed, and the run resumes.
* ``child``: every genome and log line is fsynced before the next child is asked (two fsyncs
  per child on the driver's path, a few ms each); a machine crash loses nothing finished.
"""
from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

MAX_PENDING = 512  # files queued for fsync before the driver waits (back-pressure)


def fsync_path(path: Path) -> None:
    """fsync one file by its path (gone or unreadable: nothing to do)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Syncer:
    """A daemon thread that fsyncs the paths it is handed, in order; :meth:`drain` waits for all of them.

    Args:
        max_pending: queued paths before :meth:`add` blocks.
    """

    def __init__(self, max_pending: int = MAX_PENDING):
        self._queue: queue.Queue[Path | None] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self.synced = 0
        self._thread = threading.Thread(target=self._run, name="cycleqd-fsync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            path = self._queue.get()
            try:
                if path is None:
                    return
                fsync_path(path)
                self.synced += 1
            except BaseException as e:  # noqa: BLE001 - reported by drain() on the driver's thread
                self._error = e
            finally:
                self._queue.task_done()

    def add(self, path: Path) -> None:
        """Queue ``path`` for fsync (blocks while ``max_pending`` paths wait)."""
        self._queue.put(Path(path))

    def drain(self) -> None:
        """Wait until every queued path is fsynced; re-raise an error the thread met."""
        self._queue.join()
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def close(self) -> None:
        """Drain, then stop the thread."""
        self.drain()
        self._queue.put(None)
        self._thread.join()
