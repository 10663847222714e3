"""The searches by name (``evolution.search``): ``cycleqd`` (the CycleQD scheduler, the default),
``cma_es``, ``nsga2`` and ``random``, all behind the ask/tell protocol of
:class:`~cycleqd.search.scheduler.Scheduler`.
"""
from __future__ import annotations

import os
from typing import Sequence

from cycleqd.config import Config
from cycleqd.registry import SEARCHES, register_search
from cycleqd.search.archive import Archive
from cycleqd.search.child import ChildRecord
from cycleqd.search.scheduler import Scheduler

register_search("cycleqd")(Scheduler)


def make_scheduler(cfg: Config, archive: Archive, log: Sequence[ChildRecord] = (),
                   folder: str | os.PathLike | None = None):
    """The scheduler of ``cfg.evolution.search`` over ``archive``, its state restored from ``log``;
    ``folder`` is the run folder, where CycleQD's operator control keeps its own log."""
    if cfg.evolution.search.name == "cycleqd":
        return Scheduler(cfg, archive, list(log), folder=folder)
    return SEARCHES.get(cfg.evolution.search.name)(cfg, archive, list(log))
