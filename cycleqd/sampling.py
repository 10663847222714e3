"""Parent selection from the current quality task's archive.

``elite`` follows the paper's description: for every elite, its quality and its
bin coordinates are min-max normalised across the archive and mapped into
[low, high] (paper: [0.5, 0.8]); an elite's weight is the product of those
values, and parents are drawn in proportion to it, without replacement. The
official code instead maps quality and coordinates with its own ad-hoc
schedule; the paper's rule is the documented, config-controlled one here.
``uniform`` draws elites with equal probability.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from cycleqd.archive import Elite
from cycleqd.config import SamplingConfig
from cycleqd.registry import register_sampler


def _draw(elites: Sequence[Elite], weights: np.ndarray, n: int, rng: np.random.Generator) -> list[Elite]:
    if not elites:
        raise ValueError("cannot sample parents from an empty archive")
    p = weights / weights.sum()
    replace = len(elites) < n
    idx = rng.choice(len(elites), size=n, replace=replace, p=p)
    return [elites[i] for i in idx]


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max(axis=0) - x.min(axis=0)
    return np.where(span > 0, (x - x.min(axis=0)) / np.where(span > 0, span, 1.0), 1.0)


@register_sampler("elite")
def elite(
    elites: Sequence[Elite], n: int, cfg: SamplingConfig, rng: np.random.Generator
) -> list[Elite]:
    """Draw ``n`` parents, favouring high quality and high bin coordinates (both in [low, high])."""
    feats = np.array([[e.quality, *e.cell] for e in elites], dtype=np.float64).reshape(len(elites), -1)
    mapped = cfg.low + (cfg.high - cfg.low) * _minmax(feats) if len(elites) else feats
    return _draw(elites, np.prod(mapped, axis=1), n, rng)


@register_sampler("uniform")
def uniform(
    elites: Sequence[Elite], n: int, cfg: SamplingConfig, rng: np.random.Generator
) -> list[Elite]:
    """Draw ``n`` parents with equal probability."""
    return _draw(elites, np.ones(len(elites)), n, rng)
