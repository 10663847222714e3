"""The run loop (nanoGPT-style, top to bottom), its worker pools, preflight checks, signals and growth.

Re-exported, imported on first use: ``from cycleqd.evolve import evolve``.
"""
from cycleqd.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, loop="evolve resume run_loop drive final_merge",
                                                worker="ChildWorker local_worker ready_config",
                                                pool="LocalPool RayPool", preflight="preflight", grow="grow",
                                                events="Observer", signals="RunInterrupted StopSignals")
