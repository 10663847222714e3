"""A run folder: the store (write-ahead log), its read model, its history, lock, check and file names.

Re-exported, imported on first use: ``from cycleqd.runs import RunStore``.
"""
from cycleqd.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, store="RunStore RunDamaged RunNotFound",
                                                folder="RunFolder ArchiveSnapshot best_by_mean lineage",
                                                lock="RunLock RunLocked", check="check_run CheckReport")
