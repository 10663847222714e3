"""Seed experts as task vectors and SVD factors, genomes, and the memory plan.

Its public nouns are re-exported here, imported on first use: ``from cycleqd.model import ModelInfo``.
"""
from cycleqd.registry import lazy_exports

_EXPORTS = {
    "ModelInfo": "cycleqd.model.experts",
    "inspect_model": "cycleqd.model.experts",
    "check_compatible": "cycleqd.model.experts",
    "model_fingerprint": "cycleqd.model.experts",
    "torch_dtype": "cycleqd.model.experts",
    "Factors": "cycleqd.model.factors",
    "Genome": "cycleqd.model.genome",
    "materialize": "cycleqd.model.genome",
    "iter_weights": "cycleqd.model.genome",
    "MemoryPlan": "cycleqd.model.plan",
    "memory_plan": "cycleqd.model.plan",
    "check_plan": "cycleqd.model.plan",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
