"""An engine without a model: it keeps the last genome it was given, for tasks that score the genome itself.

A worker uses it when every task of the run declares ``needs_model = False`` (``kind:
synthetic``): no weights are loaded or built, a child costs its crossover, its mutation and its
tasks' own time. Dry runs and benchmarks of the machinery (workers, Ray, the driver, resume,
plots) use it; it never generates text.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from cycleqd.engine.protocol import Engine

if TYPE_CHECKING:
    from cycleqd.model.factors import Factors
    from cycleqd.model.genome import Genome


class GenomeOnlyEngine(Engine):
    """Holds the genome of the child being scored; ``load_genome`` builds no weights."""

    def __init__(self) -> None:
        self._genome: "Genome | None" = None

    def load_genome(self, genome: "Genome", factors: "Factors") -> None:
        genome.check(factors)
        self._genome = genome

    def current_genome(self) -> "Genome":
        if self._genome is None:
            raise RuntimeError("no genome loaded yet")
        return self._genome

    def resident_bytes(self) -> int:
        return 0
