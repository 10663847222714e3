"""Engine figures: vLLM over transformers on SmolLM2-135M, weight swaps, the memory plan against measured bytes.

* ``engine_speedup``: generated tokens per second of the vLLM engine over the
  transformers engine (both greedy, float32, on this machine's device) on real
  MBPP and DBBench prompts (first turns, chat template), with how many outputs
  are identical.
* ``weight_swap_seconds``: one full set of weights streamed into each engine
  (``Engine.load_weights``), median of 3.
* ``plan_vs_measured``: the memory plan's bytes for SmolLM2 with two experts
  next to what the engines and the resident factors actually hold.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CYCLEQD_DATA", ROOT.parent / "shared" / "data"))


def engine_requests(n_mbpp: int, n_db: int, max_new_tokens: int):
    """First-turn chat requests: ``n_mbpp`` MBPP problems (the official wording as chat turns) and ``n_db`` DBBench samples."""
    from cycleqd.engine.protocol import GenRequest
    from cycleqd.tasks.dbbench import PROMPT
    from cycleqd.tasks.mbpp import SYSTEM, MBPPTask, official_instruction

    task = MBPPTask(data=str(DATA / "mbpp" / "mbpp.jsonl"), limit=n_mbpp)
    reqs = []
    for i in task.sample_ids():
        p = task.problems[i]
        messages = ({"role": "system", "content": SYSTEM},
                    {"role": "user", "content": official_instruction(p.text, p.assertion)})
        reqs.append(GenRequest(sample_id=f"mbpp-{i}", messages=messages, max_new_tokens=max_new_tokens))
    rows = [json.loads(line) for line in (DATA / "agentbench" / "dbbench" / "dev.jsonl").read_text().splitlines()
            if line.strip()]
    for i, row in enumerate((rows * (1 + n_db // max(1, len(rows))))[:n_db]):
        messages = (
            {"role": "user", "content": PROMPT},
            {"role": "assistant", "content": "Ok."},
            {"role": "user", "content": row.get("description", "") + "\n" + row.get("add_description", "")},
        )
        reqs.append(GenRequest(sample_id=f"db-{i}", messages=messages, max_new_tokens=max_new_tokens))
    return reqs


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _tokens(tokenizer, texts) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def _smollm2_folder() -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("smollm2_e2e", ROOT / "benchmarks" / "smollm2_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.smollm2_folder()


def _make_experts(base: Path, root: Path, k: int) -> dict[str, Path]:
    """``k`` perturbed copies of ``base`` (same config and tokenizer), as stand-in experts for sizing."""
    import shutil

    from safetensors.torch import load_file, save_file

    state = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    out = {}
    for j in range(k):
        folder = root / f"expert{j}"
        shutil.copytree(base, folder)
        save_file({n: (t + 1e-3 * torch.randn(t.shape, generator=gen, dtype=t.dtype)).contiguous()
                   for n, t in state.items()}, str(folder / "model.safetensors"))
        out[f"t{j}"] = folder
    return out


def bench_engine(n_prompts: int = 64, max_new_tokens: int = 48) -> dict:
    """The engine entries of bench.json (see module docstring)."""
    from safetensors.torch import load_file

    from cycleqd.config import EngineConfig, parse_config
    from cycleqd.engine.hf import HFEngine
    from cycleqd.engine.vllm import VLLMEngine
    from cycleqd.model.factors import Factors
    from cycleqd.model.plan import memory_plan

    folder = _smollm2_folder()
    reqs = engine_requests(n_prompts // 2, n_prompts - n_prompts // 2, max_new_tokens)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    rss0 = _rss()
    # decoding itself is compared: no drafts (the warm-up's completions would be some)
    hf = HFEngine.from_path(str(folder), EngineConfig(device="auto", batch_size=32, options={"draft_memory": 0}),
                            dtype="float32")
    rss1 = _rss()
    vl = VLLMEngine.from_path(str(folder), EngineConfig(name="vllm"), dtype="float32")
    rss2 = _rss()
    out: dict = {}
    speeds, texts = {}, {}
    for name, eng in (("transformers", hf), ("vllm", vl)):
        eng.generate(reqs[:2])  # warm-up
        t0 = time.perf_counter()
        texts[name] = eng.generate(reqs)
        dt = time.perf_counter() - t0
        speeds[name] = _tokens(hf.tokenizer, texts[name]) / dt
    same = sum(a == b for a, b in zip(texts["transformers"], texts["vllm"]))
    out["engine_speedup"] = speeds["vllm"] / speeds["transformers"]
    out["engine"] = {"model": "SmolLM2-135M-Instruct", "prompts": len(reqs), "max_new_tokens": max_new_tokens,
                     "transformers_tokens_per_s": speeds["transformers"], "vllm_tokens_per_s": speeds["vllm"],
                     "identical_outputs": same, "device": str(hf.device)}

    state = load_file(str(folder / "model.safetensors"))
    swaps = {}
    for name, eng in (("transformers", hf), ("vllm", vl)):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            eng.load_weights(iter(state.items()))
            times.append(time.perf_counter() - t0)
        swaps[name] = statistics.median(times)
    out["weight_swap_seconds"] = swaps

    with tempfile.TemporaryDirectory() as tmp:
        experts = _make_experts(folder, Path(tmp), 2)
        measured = {"engine weights (transformers)": hf.resident_bytes(),
                    "engine weights (vllm, visible tensors)": vl.resident_bytes(),
                    "process RSS growth (transformers engine)": rss1 - rss0,
                    "process RSS growth (vllm engine, with its KV cache)": rss2 - rss1}
        cfg = parse_config({
            "models": {"base": str(folder), "experts": {t: str(p) for t, p in experts.items()}, "dtype": "float32"},
            "tasks": [{"name": t, "kind": "likelihood", "data": "x"} for t in experts],
            "evolution": {"mutation": {"rank": 64}},
            "factors": {"svd_method": "randomized"},
            "prepare_cache": str(Path(tmp) / "cache"),
        })
        factors = Factors.prepare(cfg, progress=False)
        planned = {i.what: i.bytes for i in memory_plan(cfg).items}
        measured["base"] = sum(t.numel() * t.element_size() for t in factors.base.values())
        measured["task vectors"] = sum(t.numel() * t.element_size() for t in factors.tau.values())
        measured["svd factors (rank 64)"] = sum(t.numel() * t.element_size() for g in (factors.U, factors.S, factors.Vt)
                                                for t in g.values())
        w = planned.pop("engine weights")
        planned["engine weights (transformers)"] = planned["engine weights (vllm, visible tensors)"] = w
        planned["process RSS growth (transformers engine)"] = w
        planned["process RSS growth (vllm engine, with its KV cache)"] = w + int(
            float(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * 1024**3)
        out["plan_vs_measured"] = {k: {"plan": planned.get(k), "measured": v} for k, v in measured.items()}
    return out


if __name__ == "__main__":
    print(json.dumps(bench_engine(), indent=1))
