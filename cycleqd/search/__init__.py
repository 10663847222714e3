"""The search over genomes: archives, parent sampling, crossover, mutation, the CycleQD scheduler
(ask/tell) and the records of a child.

Re-exported, imported on first use: ``from cycleqd.search import Archive``.
"""
from cycleqd.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, archive="Archive Elite", scheduler="Scheduler OrderError",
                                                child="ChildSpec ChildResult ChildRecord SeedRecord")
