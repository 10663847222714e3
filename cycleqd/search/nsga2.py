"""``evolution.search: nsga2``: NSGA-II over the merge coefficients (Mergenetic's multi-objective
search), with the K task qualities as its objectives.

pymoo's NSGA-II by ask/tell: the first batch is its random initial population, every later
batch one offspring population (simulated binary crossover and polynomial mutation inside the
box); survival is by non-dominated rank and crowding distance. All of its randomness comes
from the run's seed. The Pareto front of every child scored so far is its archive: kept in
``RUN/search.json`` and drawn by ``cycleqd heatmap``.
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from cycleqd.registry import register_search
from cycleqd.search.coefficients import CoefficientSearch
from cycleqd.search.front import pareto_front
from cycleqd.search.space import SpaceOptions


class NSGA2Options(SpaceOptions):
    """Options of ``nsga2`` (plus the space's: granularity, layers_per_group, bounds).

    Attributes:
        population: NSGA-II's population and offspring size per batch.
    """

    population: int = Field(8, ge=2, le=10_000)


@register_search("nsga2")
class NSGA2Search(CoefficientSearch):
    """NSGA-II behind the scheduler's ask/tell protocol (see :class:`CoefficientSearch`)."""

    name = "nsga2"
    Options = NSGA2Options

    def _setup(self) -> None:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem
        from pymoo.core.termination import NoTermination

        seed = int(np.random.SeedSequence([self.cfg.seed, 4]).generate_state(1)[0])
        self.problem = Problem(n_var=self.space.dim, n_obj=len(self.tasks), xl=self.space.lo, xu=self.space.hi)
        self.algorithm = NSGA2(pop_size=self.options.population)
        self.algorithm.setup(self.problem, termination=NoTermination(), seed=seed, verbose=False)
        self._pop = None
        self._scores: dict[str, dict[str, float]] = {}
        self._front: list[str] = []

    def _draw(self) -> list[np.ndarray]:
        self._pop = self.algorithm.ask()
        return [np.array(x, dtype=np.float64) for x in self._pop.get("X")]

    def _learn(self, points: list[np.ndarray], values: list[np.ndarray]) -> None:
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem

        F = -np.stack(values)  # pymoo minimises; qualities are maximised
        Evaluator().eval(StaticProblem(self.problem, F=F), self._pop)
        self.algorithm.tell(infills=self._pop)

    def _on_told(self, index: int, scores) -> None:
        if scores:
            gid = f"g{index + 1:06d}"
            self._scores[gid] = dict(scores)
            self._front = pareto_front({g: self._scores[g] for g in [*self._front, gid]}, self.tasks)

    def front(self) -> list[dict]:
        """The Pareto front of the children told so far: [{"genome", "scores"}], in ask order."""
        return [{"genome": g, "scores": self._scores[g]} for g in sorted(self._front)]

    def _state(self) -> dict:
        return {"population": self.options.population, "front": self.front()}
