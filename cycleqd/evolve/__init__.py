"""The run loop (nanoGPT-style, top to bottom), its worker pools, preflight checks, signals and growth.

Its public nouns are re-exported here, imported on first use: ``from cycleqd.evolve import evolve``.
"""
from cycleqd.registry import lazy_exports

_EXPORTS = {
    "evolve": "cycleqd.evolve.loop",
    "resume": "cycleqd.evolve.loop",
    "run_loop": "cycleqd.evolve.loop",
    "drive": "cycleqd.evolve.loop",
    "final_merge": "cycleqd.evolve.loop",
    "ChildWorker": "cycleqd.evolve.worker",
    "local_worker": "cycleqd.evolve.worker",
    "ready_config": "cycleqd.evolve.worker",
    "LocalPool": "cycleqd.evolve.pool",
    "RayPool": "cycleqd.evolve.pool",
    "preflight": "cycleqd.evolve.preflight",
    "grow": "cycleqd.evolve.grow",
    "Observer": "cycleqd.evolve.events",
    "RunInterrupted": "cycleqd.evolve.signals",
    "StopSignals": "cycleqd.evolve.signals",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
