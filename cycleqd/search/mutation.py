"""Mutation operators: pure functions from a genome to a mutated genome.

Every operator has the signature
``fn(genome, q, cfg: MutationConfig, gen: torch.Generator, factors) -> Genome``
where q is the index of the quality task (the expert whose basis the SVD
mutation moves along) and all randomness comes from ``gen``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from cycleqd.config import MutationConfig
from cycleqd.model.genome import Genome, NoiseTerm
from cycleqd.registry import register_mutation

if TYPE_CHECKING:
    from cycleqd.model.factors import Factors


@register_mutation("svd")
def svd(genome: Genome, q: int, cfg: MutationConfig, gen: torch.Generator, factors: "Factors") -> Genome:
    """SVD mutation along expert q's task-vector basis (the official CycleQD semantics).

    For every SVD weight (2-D, not a norm; in ``factors.svd_names`` order):
    ``tau += U_q diag(r * S_q) V_q^T`` with ``r ~ U[0, rate)^rank`` drawn
    elementwise, i.e. ``d_q += r * S_q``. With a truncated rank only the top
    directions move.

    Raises:
        IndexError: q is not an expert index.
    """
    K = factors.num_experts
    if not 0 <= q < K:
        raise IndexError(f"quality task index {q} out of range for {K} experts")
    d = genome.d.clone()
    for name in factors.svd_names:
        r = factors.ranks[name]
        scales = torch.rand(r, generator=gen) * cfg.rate
        d[factors.d_slices[name]].view(K, r)[q].add_(scales * factors.S[name][q])
    return replace(genome, d=d)


@register_mutation("gaussian")
def gaussian(genome: Genome, q: int, cfg: MutationConfig, gen: torch.Generator, factors: "Factors") -> Genome:
    """Gaussian mutation (the ablation baseline): ``theta += N(0, std^2)`` on every tensor.

    Stored as a seeded :class:`NoiseTerm`, so the genome grows by a few bytes;
    ``q`` is unused.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    term = NoiseTerm(seed=seed, std=cfg.std, coef=torch.ones(factors.num_tensors))
    return genome.with_term(term)
