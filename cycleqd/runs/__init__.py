"""A run folder: the store (write-ahead log), its read model, its history, lock, check and file names.

Its public nouns are re-exported here, imported on first use: ``from cycleqd.runs import RunStore``.
"""
from cycleqd.registry import lazy_exports

_EXPORTS = {
    "RunStore": "cycleqd.runs.store",
    "RunDamaged": "cycleqd.runs.store",
    "RunNotFound": "cycleqd.runs.store",
    "RunFolder": "cycleqd.runs.folder",
    "ArchiveSnapshot": "cycleqd.runs.folder",
    "best_by_mean": "cycleqd.runs.folder",
    "lineage": "cycleqd.runs.folder",
    "RunLock": "cycleqd.runs.lock",
    "RunLocked": "cycleqd.runs.lock",
    "check_run": "cycleqd.runs.check",
    "CheckReport": "cycleqd.runs.check",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
