"""Crossover operators: pure functions from parent genomes to a child genome.

Every operator has the signature
``fn(parents, cfg: CrossoverConfig, gen: torch.Generator, factors) -> Genome``
and takes all its randomness from ``gen``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from cycleqd.config import CrossoverConfig
from cycleqd.model.genome import Genome
from cycleqd.registry import register_crossover

if TYPE_CHECKING:
    from cycleqd.model.factors import Factors

_MIN_WEIGHT_SUM = 1e-6


def _draw_weights(shape: tuple[int, ...], cfg: CrossoverConfig, gen: torch.Generator) -> torch.Tensor:
    """w ~ N(1 + mu, sigma^2), float32 on the CPU (the official code's draw)."""
    return torch.normal(1.0 + cfg.mu, cfg.sigma, size=shape, generator=gen)


@register_crossover("linear")
def linear(
    parents: Sequence[Genome], cfg: CrossoverConfig, gen: torch.Generator, factors: "Factors"
) -> Genome:
    """Model-wise linear merge: ``tau_child = sum_i w_i tau_i / sum_i w_i``, ``w_i ~ N(1 + mu, sigma^2)``.

    One weight per parent for the whole model (the official CycleQD crossover).

    Raises:
        ValueError: fewer than one parent, or weights summing to (almost) zero.
    """
    if not parents:
        raise ValueError("linear crossover needs at least one parent")
    w = _draw_weights((len(parents),), cfg, gen)
    total = float(w.sum())
    if abs(total) < _MIN_WEIGHT_SUM:
        raise ValueError(f"linear crossover: weights {w.tolist()} sum to ~0; lower sigma")
    return Genome.combine(parents, [float(x) / total for x in w], factors=factors)


@register_crossover("layerwise")
def layerwise(
    parents: Sequence[Genome], cfg: CrossoverConfig, gen: torch.Generator, factors: "Factors"
) -> Genome:
    """Linear merge with one weight draw per layer group.

    Groups are ``Factors.groups``: one per decoder layer index, plus one for every
    tensor outside the layers (embeddings, final norm, head). Within a group,
    ``tau_child = sum_i w_gi tau_i / sum_i w_gi``.

    Raises:
        ValueError: no parents, or a group's weights summing to (almost) zero.
    """
    if not parents:
        raise ValueError("layerwise crossover needs at least one parent")
    w = _draw_weights((factors.num_groups, len(parents)), cfg, gen)
    totals = w.sum(dim=1, keepdim=True)
    if bool((totals.abs() < _MIN_WEIGHT_SUM).any()):
        raise ValueError("layerwise crossover: a layer's weights sum to ~0; lower sigma")
    per_group = w / totals  # [G, P]
    groups = torch.tensor(factors.groups, dtype=torch.long)
    per_tensor = per_group[groups]  # [T, P]
    return Genome.combine(parents, [per_tensor[:, i] for i in range(len(parents))], factors=factors)
