"""The search over genomes: archives, parent sampling, crossover, mutation, the CycleQD scheduler
(ask/tell) and the records of a child.

Its public nouns are re-exported here, imported on first use: ``from cycleqd.search import Archive``.
"""
from cycleqd.registry import lazy_exports

_EXPORTS = {
    "Archive": "cycleqd.search.archive",
    "Elite": "cycleqd.search.archive",
    "Scheduler": "cycleqd.search.scheduler",
    "OrderError": "cycleqd.search.scheduler",
    "ChildSpec": "cycleqd.search.child",
    "ChildResult": "cycleqd.search.child",
    "ChildRecord": "cycleqd.search.child",
    "SeedRecord": "cycleqd.search.child",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
