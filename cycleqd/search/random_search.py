"""``evolution.search: random``: points drawn uniformly in the coefficient box, the floor.

Point ``index`` is a function of the run's seed and the index only, so nothing is learnt and
nothing waits: every worker always has a child in flight.
"""
from __future__ import annotations

import numpy as np

from cycleqd.registry import register_search
from cycleqd.search.coefficients import CoefficientSearch


@register_search("random")
class RandomSearch(CoefficientSearch):
    """Uniform random search over the coefficient box (see :class:`CoefficientSearch`)."""

    name = "random"
    blocking = False

    def _draw(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.cfg.seed, self._drawn, 2])
        return [rng.uniform(self.space.lo, self.space.hi, size=self.space.dim)]

    def _on_told(self, index: int, scores) -> None:
        mean = float(np.mean([scores[t] for t in self.tasks])) if scores else None
        best = getattr(self, "_best", None)
        if mean is not None and (best is None or mean > best[1]):
            self._best = (index, mean)

    def _state(self) -> dict:
        best = getattr(self, "_best", None)
        return {"best": None if best is None else {"genome": f"g{best[0] + 1:06d}", "mean": best[1]}}
