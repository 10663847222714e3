"""The engine protocol under the name task packages written against older cycleqd import.

``from cycleqd.engine.base import GenRequest`` is :mod:`cycleqd.engine.protocol`'s ``GenRequest``;
new code imports from :mod:`cycleqd.engine.protocol` (or :mod:`cycleqd.engine`).
"""
from cycleqd.engine.protocol import Engine, EngineUnsupported, GenRequest, Weights, encode_request

__all__ = ["Engine", "EngineUnsupported", "GenRequest", "Weights", "encode_request"]
