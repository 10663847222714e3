"""Grouped LoRA kernels for vLLM's CPU backend: one matmul per adapter in the batch, not a weight per token.

vLLM-CPU applies multi-LoRA through ``vllm.lora.ops.torch_ops``: its CPU wrapper calls the
per-request ``sgmv_*`` ops for every linear layer, and those expand the requests' slots into a
per-token index (``repeat_interleave``) and call the per-row ``bgmv_*`` ops, which gather the
adapter's weight matrix once per token (``weights[indices]``: a ``[tokens, out, in]`` copy) and
contract it with an einsum. A prefill of T tokens so copies T weight matrices per LoRA module and
layer, and costs far more than the model's own matmuls. Those ops also read index ``-1`` (a row
without an adapter) as the last slot's adapter. :func:`install` replaces them, in this process,
with ops that apply each adapter's matrix to its rows in place: the ``sgmv`` ops read each
request's rows from the batch's metadata and do one ``addmm_`` per run of one adapter's rows
(the shrink of children over LoRA experts, which share ``A``, one for all rows); the ``bgmv``
ops (the logits) one gathered matmul per adapter in a step that mixes them. Rows without an
adapter get no LoRA term. The sums are those of an ordinary ``x @ W^T``.

Installed by :meth:`cycleqd.engine.vllm.VLLMEngine.from_path` when ``enable_lora`` runs on a
CPU (the engine core runs in this process there, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
"""
from __future__ import annotations

import torch

_INSTALLED = False
#: vLLM's own ops, as they were before :func:`install` replaced them (name -> function).
_VLLM_OPS: dict[str, object] = {}
#: Up to this many runs of rows (a prefill's requests) get one in-place matmul each; more (a decode
#: step interleaving adapters row by row) are gathered per adapter.
MAX_RUNS = 256
#: Rows x slots x output features up to which all slots' matrices are applied in one matmul (a decode
#: step's few rows); above it (a prefill's many rows) each run gets its own.
STACKED_BUDGET = 1 << 21


def _3d(weights: torch.Tensor) -> torch.Tensor:
    """vLLM's stacked LoRA weights ``[L, 1, out, in]`` (or already ``[L, out, in]``) as ``[L, out, in]``."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _runs(indices: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(start, end, slot)`` of each run of equal adapter slots (rows of one request are one run in a prefill)."""
    if indices.numel() == 0:
        return []
    cut = (indices[1:] != indices[:-1]).nonzero().flatten().add(1).tolist()
    starts, ends = [0, *cut], [*cut, int(indices.numel())]
    slots = indices[starts].tolist()
    return list(zip(starts, ends, slots))


def _lora_mm(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, out: torch.Tensor,
             scale: float, add: bool) -> None:
    """``out[i] (+)= scale * inputs[i] @ weights[indices[i]]^T`` for every row i; rows with slot -1 untouched
    (or zeroed when not ``add``). ``weights``: ``[L, out, in]`` or ``[L, 1, out, in]``.

    Contiguous runs of one adapter (a prefill's requests) are one in-place matmul each on row
    slices; more than :data:`MAX_RUNS` short runs (a big decode step mixing adapters) are gathered
    per adapter instead.
    """
    weights = _3d(weights)
    n = min(inputs.shape[0], indices.shape[0], out.shape[0])
    if not add:
        out.zero_()
    if n == 0:
        return
    x, idx = inputs[:n].to(out.dtype), indices[:n]
    runs = _runs(idx)
    slots = {s for _, _, s in runs}
    live = [s for s in slots if s >= 0]
    m = max(live, default=-1) + 1
    if len(runs) > 1 and live and n * m * weights.shape[1] <= STACKED_BUDGET:
        # a decode step: every slot's matrix at once (a view of the stacked weights, no copy), each row
        # then keeps its own slot's part: one matmul where runs would be many small ones
        both = (x @ weights[:m].reshape(m * weights.shape[1], -1).to(out.dtype).t()).view(n, m, -1)
        pick = idx.clamp(min=0).view(n, 1, 1).expand(n, 1, both.shape[2])
        term = both.gather(1, pick).squeeze(1)
        if (idx < 0).any():
            term[idx < 0] = 0
        out[:n].add_(term, alpha=scale)
        return
    if len(runs) <= max(MAX_RUNS, 2 * len(slots)):
        _mm_runs(x, weights, runs, out, scale)
        return
    for slot in sorted(slots):
        if slot < 0:
            continue
        rows = (idx == slot).nonzero().flatten()
        out.index_add_(0, rows, x[rows] @ weights[slot].to(out.dtype).t(), alpha=scale)


def _mm_runs(x: torch.Tensor, weights: torch.Tensor, runs: list[tuple[int, int, int]], out: torch.Tensor,
             scale: float) -> None:
    """``out[a:b] += scale * x[a:b] @ weights[slot]^T`` for each run (slot -1: nothing); ``weights`` 3-D."""
    for a, b, slot in runs:
        if slot >= 0:
            out[a:b].addmm_(x[a:b], weights[slot].to(out.dtype).t(), alpha=scale)


def _request_runs(b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor,
                  lora_indices_tensor: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(start, end, slot)`` per run of rows of one adapter, read from the batch's per-request metadata
    (what vLLM's ``sgmv`` ops get; adjacent requests of one adapter are one run)."""
    runs: list[tuple[int, int, int]] = []
    for a, n, slot in zip(b_seq_start_loc.tolist(), seq_len_tensor.tolist(), lora_indices_tensor.tolist()):
        if n <= 0:
            continue
        if runs and runs[-1][2] == slot and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], a + n, slot)
        else:
            runs.append((a, a + n, slot))
    return runs


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    """vLLM's per-request shrink (its signature): ``output[rows, :r] = scaling * x @ A_slot^T`` for each
    request's rows, one matmul for all when the requests' adapters share ``A``; no per-token index."""
    runs = _request_runs(b_seq_start_loc, seq_len_tensor, lora_indices_tensor)
    w = _3d(lora_a_weights)
    out = output_tensor[:, :w.shape[1]]
    out.zero_()
    x = inputs.to(out.dtype)
    slots = sorted({s for _, _, s in runs if s >= 0})
    if len(slots) > 1 and _one_matrix(w, slots):
        live = [(a, b) for a, b, s in runs if s >= 0]
        if len(live) == 1 or live[-1][1] - live[0][0] == sum(b - a for a, b in live):  # one block of rows
            a, b = live[0][0], live[-1][1]
            out[a:b].addmm_(x[a:b], w[slots[0]].to(out.dtype).t(), alpha=scaling)
            return
    _mm_runs(x, w, runs, out, scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):
    """vLLM's per-request expand (its signature): ``output[rows] (+)= x @ B_slot^T`` over the columns both have."""
    w = _3d(lora_b_weights)
    common = min(w.shape[1], output_tensor.shape[1])
    out = output_tensor[:, :common]
    if not add_inputs:
        out.zero_()
    _mm_runs(inputs.to(out.dtype), w[:, :common], _request_runs(b_seq_start_loc, seq_len_tensor, lora_indices_tensor),
             out, 1.0)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):
    """vLLM's per-request expand into ``output[:, offset:offset + size]`` (its signature)."""
    w = _3d(lora_b_weights)
    out = output_tensor[:, slice_offset:slice_offset + slice_size]
    if not add_inputs:
        out.zero_()
    _mm_runs(inputs.to(out.dtype), w, _request_runs(b_seq_start_loc, seq_len_tensor, lora_indices_tensor), out, 1.0)


#: (weights' storage, its version, slots) -> whether those slots hold one matrix (bounded; see _one_matrix)
_SAME: dict[tuple, bool] = {}


def _one_matrix(weights: torch.Tensor, slots: list[int]) -> bool:
    """Whether every slot in ``slots`` holds the same matrix. Children over LoRA experts all share
    ``A = [V_k^T]_k`` (:func:`cycleqd.model.lora.child_adapter`), so their shrink is one matmul.
    Cached by the tensor's version counter, which every write into a slot moves."""
    if len(slots) < 2:
        return True
    key = (weights.data_ptr(), weights._version, tuple(slots))
    same = _SAME.get(key)
    if same is None:
        first = weights[slots[0]]
        same = all(torch.equal(weights[j], first) for j in slots[1:])
        if len(_SAME) > 4096:
            _SAME.clear()
        _SAME[key] = same
    return same


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    """``output[:, :r] = scaling * x @ A_i^T`` row by row (vLLM's signature); one matmul for all rows
    when their adapters share ``A``."""
    r = lora_a_weights.shape[-2]
    out = output_tensor[:, :r]
    n = min(inputs.shape[0], lora_indices_tensor.shape[0], out.shape[0])
    idx = lora_indices_tensor[:n]
    slots = sorted(s for s in set(idx.tolist()) if s >= 0) if n else []
    w = _3d(lora_a_weights)
    if len(slots) > 1 and _one_matrix(w, slots):
        out.zero_()
        out[:n].addmm_(inputs[:n].to(out.dtype), w[slots[0]].to(out.dtype).t(), alpha=scaling)
        if (idx < 0).any():
            out[:n][idx < 0] = 0
        return
    _lora_mm(inputs, lora_a_weights, lora_indices_tensor, out, scaling, add=False)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    """``output (+)= x @ B_i^T`` row by row, over the columns both have (vLLM's signature)."""
    common = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    w = lora_b_weights[..., :common, :]
    if inputs.shape[0] == 1 and output_tensor.shape[0] != 1:  # vLLM's rule: one input row updates row 0 only
        _lora_mm(inputs, w, lora_indices_tensor[:1], output_tensor[:1, :common], 1.0, add=add_inputs)
        return
    _lora_mm(inputs, w, lora_indices_tensor, output_tensor[:, :common], 1.0, add=add_inputs)


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    """``output[:, offset:offset + size] (+)= x @ B_i^T`` row by row (vLLM's signature)."""
    _lora_mm(inputs, lora_b_weights, lora_indices_tensor,
             output_tensor[:, slice_offset : slice_offset + slice_size], 1.0, add=add_inputs)


#: The ops replaced: per row (``bgmv``, decode and logits) and per request (``sgmv``, what the CPU wrapper
#: calls for every linear layer).
_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def vllm_ops():
    """vLLM's own torch LoRA ops (:data:`_OPS`), even after :func:`install`: the reference the grouped
    ops are checked against."""
    from types import SimpleNamespace

    from vllm.lora.ops.torch_ops import lora_ops

    return SimpleNamespace(**{n: _VLLM_OPS.get(n, getattr(lora_ops, n)) for n in _OPS})


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
    ours = {name: globals()[name] for name in _OPS}
    for name in _OPS:
        _VLLM_OPS.setdefault(name, getattr(lora_ops, name))
    for mod in (lora_ops, punica_cpu):
        for name, fn in ours.items():
            if hasattr(mod, name):
                setattr(mod, name, fn)
    _INSTALLED = True
    return True
