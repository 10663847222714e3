from cycleqd.engine.protocol import Engine, GenRequest

__all__ = ["Engine", "GenRequest"]
