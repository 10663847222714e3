"""Engines that generate text and own their model's weights: transformers, vLLM, and the replay of
recorded answers; one protocol (:class:`Engine`) that declares every call.

``from cycleqd.engine import Engine, HFEngine`` (engines are imported on first use).
"""
from cycleqd.registry import lazy_exports

_EXPORTS = {
    "Engine": "cycleqd.engine.protocol",
    "EngineUnsupported": "cycleqd.engine.protocol",
    "GenRequest": "cycleqd.engine.protocol",
    "HFEngine": "cycleqd.engine.hf",
    "VLLMEngine": "cycleqd.engine.vllm",
    "ReplayEngine": "cycleqd.engine.answers",
    "DraftedDecoder": "cycleqd.engine.drafted",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
