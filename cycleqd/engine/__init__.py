"""Engines that generate text and own their model's weights: transformers, vLLM, and the replay of
recorded answers; one protocol (:class:`Engine`) that declares every call.

``from cycleqd.engine import Engine, HFEngine`` (engines are imported on first use).
"""
from cycleqd.registry import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, protocol="Engine EngineUnsupported GenRequest", hf="HFEngine",
                                                vllm="VLLMEngine", answers="ReplayEngine", drafted="DraftedDecoder")
