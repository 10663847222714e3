"""``evolution.search: cma_es``: CMA-ES over the merge coefficients (mergekit-evolve's method).

One CMA-ES generation of ``population`` points is one batch (the ``cma`` package's ask/tell,
with its bound transform keeping every point in the box). Fitness, maximised, is the mean of
the K task qualities, or ``sum_t weights[t] * q_t`` with ``weights`` (mergekit-evolve's
weighted tasks). All of the optimizer's randomness comes from the run's seed.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from cycleqd.config import Config, ConfigError
from cycleqd.registry import register_search
from cycleqd.search.coefficients import CoefficientSearch
from cycleqd.search.numpy_state import GlobalNumpyStream
from cycleqd.search.space import SpaceOptions


class CMAOptions(SpaceOptions):
    """Options of ``cma_es`` (plus the space's: granularity, layers_per_group, bounds).

    Attributes:
        sigma0: initial step size as a fraction of the box width.
        x0: the starting coefficient (every slot and expert); default the box's centre.
        population: points per CMA-ES generation (default ``4 + 3 ln D``).
        weights: task -> weight of the fitness ``sum_t w_t q_t`` (default: the mean).
    """

    sigma0: float = Field(0.25, gt=0.0, le=10.0)
    x0: float | None = None
    population: int | None = Field(None, ge=2, le=10_000)
    weights: dict[str, float] | None = None


@register_search("cma_es")
class CMAESSearch(CoefficientSearch):
    """CMA-ES behind the scheduler's ask/tell protocol (see :class:`CoefficientSearch`)."""

    name = "cma_es"
    Options = CMAOptions

    @classmethod
    def _check_against(cls, options: CMAOptions, cfg: Config) -> None:
        lo, hi = options.bounds
        if options.x0 is not None and not lo <= options.x0 <= hi:
            raise ConfigError(f"evolution.search (cma_es): x0 {options.x0} is outside bounds [{lo}, {hi}]")
        if options.weights is not None:
            extra = sorted(set(options.weights) - set(cfg.task_names))
            if extra or not options.weights:
                raise ConfigError(f"evolution.search (cma_es): weights name tasks {extra or '(none)'}; "
                                  f"the tasks are {', '.join(cfg.task_names)}")

    def _setup(self) -> None:
        import cma

        lo, hi = self.space.lo, self.space.hi
        seed = int(np.random.SeedSequence([self.cfg.seed, 3]).generate_state(1)[0]) % (2**31 - 2) + 1
        self._stream = GlobalNumpyStream(seed)
        opts: dict[str, Any] = {"bounds": [lo, hi], "seed": seed, "verbose": -10, "verb_log": 0, "verb_disp": 0,
                                "signals_filename": ""}
        if self.options.population is not None:
            opts["popsize"] = self.options.population
        x0 = (lo + hi) / 2 if self.options.x0 is None else self.options.x0
        w = self.options.weights
        self._weights = (np.full(len(self.tasks), 1 / len(self.tasks)) if w is None
                         else np.array([float(w.get(t, 0.0)) for t in self.tasks]))
        with self._stream:
            self.es = cma.CMAEvolutionStrategy(np.full(self.space.dim, x0), self.options.sigma0 * (hi - lo), opts)
        self._best: tuple[int, float] | None = None

    def fitness(self, values: np.ndarray) -> float:
        """The maximised fitness of K qualities (task order)."""
        return float(self._weights @ values)

    def _draw(self) -> list[np.ndarray]:
        with self._stream:
            return [np.array(x, dtype=np.float64) for x in self.es.ask()]

    def _learn(self, points: list[np.ndarray], values: list[np.ndarray]) -> None:
        with self._stream:
            self.es.tell(points, [-self.fitness(v) for v in values])  # cma minimises

    def _on_told(self, index: int, scores) -> None:
        if scores:
            f = self.fitness(self._values_of(scores))
            if self._best is None or f > self._best[1]:
                self._best = (index, f)

    def _state(self) -> dict:
        mean = self.es.gp.pheno(self.es.mean, into_bounds=self.es.boundary_handler.repair)  # in the box
        return {"sigma": float(self.es.sigma), "mean": [float(v) for v in mean],
                "population": int(self.es.popsize), "weights": dict(zip(self.tasks, map(float, self._weights))),
                "best": None if self._best is None else {"genome": f"g{self._best[0] + 1:06d}",
                                                         "fitness": self._best[1]}}
