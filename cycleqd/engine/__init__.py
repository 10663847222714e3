from cycleqd.engine.base import Engine, GenRequest

__all__ = ["Engine", "GenRequest"]
