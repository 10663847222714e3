"""Children as LoRA adapters: a genome over LoRA experts' factors is one adapter, exactly.

With LoRA experts (:mod:`cycleqd.model.adapters`) a genome's delta on a module is
``sum_k U_k diag(a_k S_k + d_k) V_k^T``: a LoRA adapter of rank ``sum_k r_k`` with
``B = [U_1 diag(a_1 S_1 + d_1) | ... ]`` and ``A = [V_1^T; ...]`` at scale 1
(:func:`child_adapter`), written as a PEFT folder by :func:`save_adapter`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from cycleqd.model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_layout, lora_ranks, read_experts
from cycleqd.model.factors import Factors

if TYPE_CHECKING:
    from cycleqd.config import Config
    from cycleqd.model.genome import Genome

_PREFIX = "base_model.model."

def genome_shape(cfg: "Config"):
    """The :class:`~cycleqd.model.genome.GenomeShape` of a LoRA run's genomes, from headers only."""
    from cycleqd.model.genome import GenomeShape

    base, adapters = read_experts(cfg.models.base, {t: cfg.models.experts[t] for t in cfg.task_names},
                                  cfg.models.revision, load=False)
    ranks = lora_ranks(list(adapters.values()))
    K = len(cfg.task_names)
    return GenomeShape(experts=K, tensors=len(base.shapes), d_size=K * sum(ranks.values()),
                       layout=lora_layout(cfg.task_names, base.shapes, ranks),
                       model={n: tuple(int(x) for x in s) for n, s in base.shapes.items()})


@dataclass(frozen=True)
class ChildAdapter:
    """A genome as one LoRA adapter at scale 1: per module ``delta = B @ A``.

    Attributes:
        modules: base tensor name -> ``(B [m, R], A [R, n])``.
        rank: the adapter's rank R (every module padded to it with zero directions).
    """

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int

    def delta(self, name: str) -> torch.Tensor:
        B, A = self.modules[name]
        return B.float() @ A.float()

    def nbytes(self) -> int:
        return sum(B.numel() * B.element_size() + A.numel() * A.element_size() for B, A in self.modules.values())


def _check_adaptable(genome: "Genome", factors: Factors) -> None:
    if not factors.low_rank:
        raise ValueError("a child is an adapter only over LoRA experts (these factors hold dense task vectors)")
    if genome.terms:
        kinds = ", ".join(sorted({t.meta()["kind"] for t in genome.terms}))
        raise ValueError(f"this child holds {kinds} terms, which are not low rank: materialise it densely")
    genome.check(factors)


@torch.no_grad()
def child_adapter(genome: "Genome", factors: Factors, *, rank: int | None = None,
                  dtype: torch.dtype = torch.float32, shared: bool = False) -> ChildAdapter:
    """The genome's delta as a LoRA adapter: ``B = [U_k diag(a_k S_k + d_k)]_k``, ``A = [V_k^T]_k``.

    Directions with a zero coefficient are dropped (the smallest adapter, as exported), then
    every module is padded to one rank (``rank`` if given, else the largest module's), so
    engines see a uniform adapter. With ``shared`` every direction is kept, so that all
    children of these factors have the very same ``A`` per module and an engine applies it to
    all their rows with one matmul (:mod:`cycleqd.engine.vllm_lora_cpu`); the delta is the same.

    Raises:
        ValueError: dense factors, a genome with noise/delta terms, or ``rank`` below what a module needs.
    """
    _check_adaptable(genome, factors)
    K = factors.num_experts
    live: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in factors.svd_names:
        t = factors.index[name]
        r = factors.ranks[name]
        coef = genome.a[t].float()[:, None] * factors.S[name] + genome.d[factors.d_slices[name]].float().view(K, r)
        coef = coef.flatten()
        keep = torch.arange(coef.numel()) if shared else coef.ne(0).nonzero().flatten()
        if keep.numel() == 0:
            continue
        c = coef[keep].to(factors.device)
        B = factors.U[name][:, keep].float() * c
        A = factors.Vt[name][keep].float()
        live[name] = (B, A)
    need = max((B.shape[1] for B, _ in live.values()), default=1)
    R = need if rank is None else rank
    if R < need:
        raise ValueError(f"child adapter needs rank {need}, asked for {rank}")
    out = {}
    for name, (B, A) in live.items():
        pad = R - B.shape[1]
        if pad:
            B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
            A = torch.cat([A, A.new_zeros(pad, A.shape[1])], dim=0)
        out[name] = (B.to(dtype).contiguous().cpu(), A.to(dtype).contiguous().cpu())
    return ChildAdapter(out, R)


def child_rank(factors: Factors) -> int:
    """The largest rank a child adapter of these factors can need: ``max_w K * r_w``."""
    return max((factors.num_experts * r for r in factors.ranks.values()), default=1)


def save_adapter(adapter: ChildAdapter, out: str | os.PathLike, *, base_model: str,
                 extra: Mapping | None = None) -> Path:
    """Write ``adapter`` as a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``lora_alpha = r`` (scale 1), target modules named in full, so
    ``PeftModel.from_pretrained(base, out)`` and vLLM's ``LoRARequest`` load it as is.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    modules = sorted(n[: -len(".weight")] for n in adapter.modules)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": adapter.rank, "lora_alpha": adapter.rank, "use_rslora": False, "lora_dropout": 0.0,
        "target_modules": modules, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_dora": False,
    }
    config.update(extra or {})
    tensors = {}
    for name, (B, A) in adapter.modules.items():
        mod = name[: -len(".weight")]
        tensors[f"{_PREFIX}{mod}.lora_A.weight"] = A.contiguous()
        tensors[f"{_PREFIX}{mod}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))
    return out


