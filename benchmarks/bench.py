"""`make bench`: every figure measured in one run, each ratio against a baseline from the same run.

Writes bench.json with child_overhead_speedup, genome_storage_ratio,
checkpoint_bytes_read_per_child (both paths) and batched_generation_speedup,
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
    ap.add_argument("--only", choices=["core", "generation"], help="run one part")
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
    out["seconds"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.out}")
    for key in ("child_overhead_speedup", "genome_storage_ratio", "batched_generation_speedup"):
        if key in out:
            print(f"  {key:32s} {out[key]:10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
