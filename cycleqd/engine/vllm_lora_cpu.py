"""Grouped LoRA kernels for vLLM's CPU backend: one matmul per adapter in the batch, not a weight per token.

vLLM-CPU applies multi-LoRA through ``vllm.lora.ops.torch_ops`` (``bgmv_shrink``,
``bgmv_expand``, ``bgmv_expand_slice``; the ``sgmv_*`` prefill ops call them per token).
Each gathers the adapter's weight matrix once per token (``weights[indices]``: a
``[tokens, out, in]`` copy) and contracts it with an einsum, so a prefill of T tokens copies
T weight matrices per LoRA module and layer, and costs far more than the model's own
matmuls. Those ops also read index ``-1`` (a row without an adapter) as the last slot's
adapter. :func:`install` replaces them, in this process, with ops that group the rows by
adapter and apply each adapter's matrix to its rows in one matmul (rows without an adapter
get no LoRA term): the same sums, in the order of an ordinary ``x @ W^T``.

Installed by :meth:`cycleqd.engine.vllm.VLLMEngine.from_path` when ``enable_lora`` runs on a
CPU (the engine core runs in this process there, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
"""
from __future__ import annotations

import torch

_INSTALLED = False


def _apply(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row i of ``inputs`` times ``weights[indices[i]]^T`` (``[L, out, in]`` or ``[L, 1, out, in]``); zero rows for -1."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(dtype)
    n = min(x.shape[0], indices.shape[0])
    out = torch.zeros((x.shape[0], weights.shape[1]), dtype=dtype, device=x.device)
    if n == 0:
        return out
    idx = indices[:n]
    lo, hi = int(idx.min()), int(idx.max())
    if lo == hi:  # one adapter (or none) for every row: one matmul, no gather
        if lo >= 0:
            out[:n] = x[:n] @ weights[lo].to(dtype).t()
        return out
    for slot in torch.unique(idx).tolist():
        if slot < 0:
            continue
        rows = (idx == slot).nonzero().squeeze(1)
        out[rows] = x[rows] @ weights[slot].to(dtype).t()
    return out


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    """``output[:, :r] = scaling * x @ A_i^T`` row by row (vLLM's signature)."""
    outputs = _apply(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    """``output (+)= x @ B_i^T`` row by row, over the columns both have (vLLM's signature)."""
    outputs = _apply(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    """``output[:, offset:offset + size] (+)= x @ B_i^T`` row by row (vLLM's signature)."""
    outputs = _apply(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def install() -> bool:
    """Replace vLLM's CPU LoRA ops with the grouped ones (once per process); False if vLLM lacks them."""
    global _INSTALLED
    if _INSTALLED:
        return True
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return False
    for mod in (lora_ops, punica_cpu):
        for name, fn in (("bgmv_shrink", bgmv_shrink), ("bgmv_expand", bgmv_expand),
                         ("bgmv_expand_slice", bgmv_expand_slice)):
            if hasattr(mod, name):
                setattr(mod, name, fn)
    _INSTALLED = True
    return True
