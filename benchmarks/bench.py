"""`make bench`: every figure measured in one run, each ratio against a baseline from the same run.

Writes bench.json with child_overhead_speedup, genome_storage_ratio,
checkpoint_bytes_read_per_child (both paths), batched_generation_speedup,
mini_child_speedup and the engine figures (engine_speedup, weight_swap_seconds, plan_vs_measured),
and prints the baseline times beside the ratios.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--only", choices=["core", "generation", "mini_child", "engine", "adapters"], help="run one part")
    args = ap.parse_args()

    import torch

    out: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                             "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}}
    t0 = time.time()
    if args.only in (None, "core"):
        from bench_core import bench_core

        out.update(bench_core())
    if args.only in (None, "generation"):
        from bench_generation import bench_generation

        out.update(bench_generation())
    if args.only in (None, "mini_child"):
        from bench_mini_child import bench_mini_child

        out.update(bench_mini_child())
    if args.only in (None, "engine"):
        from bench_engine import bench_engine

        out.update(bench_engine())
    if args.only in (None, "adapters"):
        from bench_adapters import bench_adapters

        out.update(bench_adapters())
    out["seconds"] = round(time.time() - t0, 1)
    # merged into the file: keys of parts not run here (bench_scale's, --only's other parts) are kept
    path = Path(args.out)
    kept = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**kept, **out}, indent=2))
    print(f"\nwrote {args.out}")
    baselines = {
        "child_overhead_speedup": lambda o: f"reference {o['reference_child_seconds']:.3f} s/child "
                                            f"vs ours {o['ours_child_seconds']:.3f} s/child",
        "genome_storage_ratio": lambda o: f"checkpoint {o['checkpoint_bytes']:,} B vs genome {o['genome_bytes']:,} B",
        "batched_generation_speedup": lambda o: f"one at a time {o['single_tokens_per_s']:.1f} tok/s "
                                                f"vs batched {o['batched_tokens_per_s']:.1f} tok/s",
        "mini_child_speedup": lambda o: f"plain generate {o['mini_child_plain_seconds']:.2f} s/child "
                                        f"vs ours {o['mini_child_ours_seconds']:.2f} s/child, same scores; "
                                        "checks beside generation on a second core where one is free",
        "engine_speedup": lambda o: f"transformers {o['engine']['transformers_tokens_per_s']:.1f} tok/s vs vllm "
                                    f"{o['engine']['vllm_tokens_per_s']:.1f} tok/s, "
                                    f"{o['engine']['identical_outputs']}/{o['engine']['prompts']} identical",
    }
    for key, describe in baselines.items():
        if key in out:
            print(f"  {key:28s} {out[key]:9.2f}x   ({describe(out)})")
    if "checkpoint_bytes_read_per_child" in out:
        r = out["checkpoint_bytes_read_per_child"]
        print(f"  checkpoint bytes read/child  reference {r['reference']:,} B, ours {r['ours']:,} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
