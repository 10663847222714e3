"""The coefficient space the other searches (CMA-ES, NSGA-II, random) move in.

A point ``x`` of the space is one crossover coefficient per expert task vector and per
*slot*, where a slot is a tensor, a decoder layer or a group of consecutive layers
(``granularity``); tensors outside the decoder layers (embeddings, final norm, head)
share one slot of their own. The model of ``x`` is task arithmetic with those
coefficients,

    theta[t] = base[t] + sum_k x[slot(t), k] * tau_k[t],

i.e. a :class:`~cycleqd.model.genome.Genome` with ``a[t, k] = x[slot(t) * K + k]`` and no SVD
part: the same genome space CycleQD's children live in, built and scored by the same
workers. ``x`` lies in the box ``[lo, hi]^D`` of ``bounds``, ``D = slots * K``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from cycleqd.config import Config
    from cycleqd.model.factors import Factors
    from cycleqd.model.genome import Genome

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # as Factors' layer groups
MAX_BOUND = 100.0  # |coefficient| of a task vector: far beyond any useful merge


class SpaceOptions(BaseModel):
    """Options every coefficient search takes (``evolution.search.options``).

    Attributes:
        granularity: one coefficient per expert and ``tensor``, ``layer`` or ``layer_group``.
        layers_per_group: consecutive decoder layers per slot with ``layer_group``.
        bounds: ``[lo, hi]``, the box every coefficient stays in.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    granularity: Literal["tensor", "layer", "layer_group"] = "layer_group"
    layers_per_group: int = Field(2, ge=1, le=10_000)
    bounds: tuple[float, float] = (0.0, 1.0)

    @model_validator(mode="after")
    def _box(self) -> "SpaceOptions":
        lo, hi = self.bounds
        if not -MAX_BOUND <= lo < hi <= MAX_BOUND:
            raise ValueError(f"bounds need -{MAX_BOUND:g} <= lo < hi <= {MAX_BOUND:g}, got [{lo}, {hi}]")
        return self


def slot_map(names: Sequence[str], granularity: str, layers_per_group: int = 1) -> tuple[list[int], int]:
    """The slot of every tensor in ``names`` (sorted, as ``Factors.names``) and the slot count.

    ``tensor``: one slot per tensor; ``layer``: one per decoder layer; ``layer_group``: one per
    ``layers_per_group`` consecutive layers. Under the last two, tensors outside the layers
    share one more slot.
    """
    if granularity == "tensor":
        return list(range(len(names))), len(names)
    per = 1 if granularity == "layer" else layers_per_group
    layer_ids = [int(m.group(1)) if (m := _LAYER.search(n)) else None for n in names]
    known = sorted({i for i in layer_ids if i is not None})
    pos = {i: j // per for j, i in enumerate(known)}
    rest = (len(known) + per - 1) // per
    slots = [pos[i] if i is not None else rest for i in layer_ids]
    return slots, rest + (1 if any(i is None for i in layer_ids) else 0)


@dataclass(frozen=True)
class CoefficientSpace:
    """The box ``[lo, hi]^(slots * K)`` over a model's tensors (see the module docstring)."""

    slots: tuple[int, ...]  # per tensor, in sorted name order
    num_slots: int
    experts: int
    lo: float
    hi: float

    @classmethod
    def over(cls, names: Sequence[str], experts: int, options: SpaceOptions) -> "CoefficientSpace":
        """The space over tensors ``names`` and ``experts`` task vectors under ``options``."""
        slots, n = slot_map(sorted(names), options.granularity, options.layers_per_group)
        return cls(tuple(slots), n, experts, *options.bounds)

    @classmethod
    def of(cls, cfg: "Config", options: SpaceOptions) -> "CoefficientSpace":
        """The space of ``cfg``'s base model, from its safetensors headers (nothing loaded)."""
        from cycleqd.model.experts import inspect_model

        return cls.over(inspect_model(cfg.models.base, cfg.models.revision).shapes, len(cfg.task_names), options)

    @property
    def dim(self) -> int:
        return self.num_slots * self.experts

    def clip(self, x: np.ndarray) -> np.ndarray:
        """``x`` as a float64 vector of this space, clipped into the box.

        Raises:
            ValueError: ``x`` has the wrong length or is not finite.
        """
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.shape != (self.dim,) or not np.isfinite(x).all():
            raise ValueError(f"a point of this space has {self.dim} finite coefficients, got shape {x.shape}")
        return np.clip(x, self.lo, self.hi)

    def coefficients(self, x: Sequence[float]) -> np.ndarray:
        """``[T, K]``: every tensor's coefficients of the point ``x``."""
        grid = np.asarray(x, dtype=np.float64).reshape(self.num_slots, self.experts)
        return grid[np.asarray(self.slots, dtype=np.int64)]

    def genome(self, x: Sequence[float], factors: "Factors") -> "Genome":
        """The genome of ``x`` over ``factors`` (its tensors must be the ones this space was made over).

        Raises:
            ValueError: ``x`` is not a point of this space, or the factors have other tensors.
        """
        import torch

        from cycleqd.model.genome import Genome

        if len(self.slots) != factors.num_tensors or self.experts != factors.num_experts:
            raise ValueError(f"coefficient space of {len(self.slots)} tensors x {self.experts} experts, factors have "
                             f"{factors.num_tensors} x {factors.num_experts}")
        if len(x) != self.dim:
            raise ValueError(f"a point of this space has {self.dim} coefficients, got {len(x)}")
        a = torch.tensor(self.coefficients(x), dtype=torch.float32)
        return Genome(a=a, d=torch.zeros(factors.d_size), layout=factors.layout)


def coefficient_genome(coefficients: Sequence[float], cfg: "Config", factors: "Factors") -> "Genome":
    """The genome a worker builds for a child spec that carries ``coefficients`` (no parents)."""
    options = SpaceOptions.model_validate(_space_part(cfg.evolution.search.options))
    space = CoefficientSpace.over(factors.names, factors.num_experts, options)
    x = np.asarray(coefficients, dtype=np.float64)
    if x.shape != (space.dim,) or not np.isfinite(x).all() or x.min() < space.lo or x.max() > space.hi:
        raise ValueError(f"coefficients are not a point of the box [{space.lo}, {space.hi}]^{space.dim}")
    return space.genome(x, factors)


def _space_part(options: dict) -> dict:
    return {k: v for k, v in options.items() if k in SpaceOptions.model_fields}
