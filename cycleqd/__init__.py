"""cycleqd: evolutionary model merging of LLMs with CycleQD."""

__version__ = "0.1.0"
