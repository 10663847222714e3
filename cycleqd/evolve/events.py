"""What the loop tells the outside world: the :class:`Observer` protocol.

The loop never imports a view; its caller passes observers (plots, progress bars).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol, Sequence

from cycleqd.search.archive import Archive
from cycleqd.search.child import ChildRecord

log = logging.getLogger("cycleqd")


class Observer(Protocol):
    """What the loop tells the outside world (plots, progress bars); an observer never stops a run."""

    def seeds_done(self, run_dir: Path, archive: Archive) -> None: ...

    def child_done(self, run_dir: Path, record: ChildRecord, archive: Archive) -> None: ...

    def run_done(self, run_dir: Path, archive: Archive) -> None: ...


def notify(observers: Sequence[Observer], event: str, *args: Any) -> None:
    for o in observers:
        try:
            getattr(o, event)(*args)
        except Exception as e:  # observers never stop a run
            log.warning("observer %s failed on %s: %s", type(o).__name__, event, e)
