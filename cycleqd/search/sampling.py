"""Parent selection from the current quality task's archive.

``elite``: for every elite, its quality and each of its bin coordinates is a factor;
each factor is min-max normalised across the archive to x in [0, 1] and mapped to a
weight, an elite's weight is the product of its factors' weights, and parents are
drawn in proportion to it, without replacement. ``cfg.mapping`` picks the map:

- ``paper`` (the paper's text): ``low + (high - low) * x``, i.e. into [0.5, 0.8];
- ``official`` (the official CycleQD code): ``low + high * x``, i.e. into [0.5, 1.3],
  which is about 3x the selection pressure of the paper's range for three factors.

A factor that is the same for every elite weighs 1 under both maps (it cannot
prefer anyone). ``uniform`` draws elites with equal probability.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from cycleqd.config import SamplingConfig
from cycleqd.registry import register_sampler
from cycleqd.search.archive import Elite


def _draw(elites: Sequence[Elite], weights: np.ndarray, n: int, rng: np.random.Generator) -> list[Elite]:
    if not elites:
        raise ValueError("cannot sample parents from an empty archive")
    p = weights / weights.sum()
    replace = len(elites) < n
    idx = rng.choice(len(elites), size=n, replace=replace, p=p)
    return [elites[i] for i in idx]


def factor_weights(feats: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """Per-factor weights of an (elites x factors) array under ``cfg.mapping`` (see module docstring)."""
    lo, span = feats.min(axis=0), feats.max(axis=0) - feats.min(axis=0)
    x = (feats - lo) / np.where(span > 0, span, 1.0)
    scale = cfg.high if cfg.mapping == "official" else cfg.high - cfg.low
    return np.where(span > 0, cfg.low + scale * x, 1.0)


@register_sampler("elite")
def elite(
    elites: Sequence[Elite], n: int, cfg: SamplingConfig, rng: np.random.Generator
) -> list[Elite]:
    """Draw ``n`` parents, favouring high quality and high bin coordinates (see module docstring)."""
    feats = np.array([[e.quality, *e.cell] for e in elites], dtype=np.float64).reshape(len(elites), -1)
    weights = np.prod(factor_weights(feats, cfg), axis=1) if len(elites) else np.ones(0)
    if len(elites) and weights.sum() <= 0:  # low = 0 can zero every weight; fall back to uniform
        weights = np.ones(len(elites))
    return _draw(elites, weights, n, rng)


@register_sampler("uniform")
def uniform(
    elites: Sequence[Elite], n: int, cfg: SamplingConfig, rng: np.random.Generator
) -> list[Elite]:
    """Draw ``n`` parents with equal probability."""
    return _draw(elites, np.ones(len(elites)), n, rng)
