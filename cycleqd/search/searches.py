"""The searches by name (``evolution.search``): ``cycleqd`` (the CycleQD scheduler, the default),
``cma_es``, ``nsga2`` and ``random``, all behind the ask/tell protocol of
:class:`~cycleqd.search.scheduler.Scheduler`.
"""
from __future__ import annotations

from typing import Sequence

from cycleqd.config import Config
from cycleqd.registry import SEARCHES, register_search
from cycleqd.search.archive import Archive
from cycleqd.search.child import ChildRecord
from cycleqd.search.scheduler import Scheduler

register_search("cycleqd")(Scheduler)


def make_scheduler(cfg: Config, archive: Archive, log: Sequence[ChildRecord] = ()):
    """The scheduler of ``cfg.evolution.search`` over ``archive``, its state restored from ``log``."""
    return SEARCHES.get(cfg.evolution.search.name)(cfg, archive, list(log))
