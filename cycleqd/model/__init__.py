"""Seed experts as task vectors and SVD factors, genomes, and the memory plan.

Re-exported, imported on first use: ``from cycleqd.model import ModelInfo``.
"""
from cycleqd.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__,
                                                experts="ModelInfo inspect_model check_compatible model_fingerprint torch_dtype",
                                                factors="Factors", genome="Genome materialize iter_weights",
                                                plan="MemoryPlan memory_plan check_plan",
                                                adapters="LoraAdapter lora_svd", lora="ChildAdapter child_adapter save_adapter")
