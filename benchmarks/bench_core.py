"""Core benchmark: the cost of making one child, genome path vs the reference checkpoint path.

Reference path (what the official CycleQD code does per child): load the two
parent checkpoints with ``from_pretrained``, take their task vectors against the
base, merge them linearly, add the SVD mutation ``U_q diag(r S_q) V_q^T`` per
weight, and ``load_state_dict`` the result into the engine's model.

Genome path (cycleqd): crossover and mutation on genomes, then ``materialize``
into the engine model's tensors in place, from the resident base, task vectors
and SVD factors.

Both paths use the same SVD factors of the same rank (``RANK``), the same random
draws and fp32 arithmetic, and produce the same child weights (the maximum
difference is reported). The parents are children of earlier crossovers and
mutations along all three experts, so the genome path multiplies by all K*r
factor columns (its worst case).

Run: ``python benchmarks/bench_core.py`` (prints a JSON object).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

from cycleqd.config import CrossoverConfig, MutationConfig
from cycleqd.model.factors import Factors
from cycleqd.model.genome import Genome, materialize
from cycleqd.search.crossover import linear
from cycleqd.search.mutation import svd

# SVD rank per expert and weight, used by both paths: ~8% of the 768 full rank;
# mutation moves along each expert's top directions, where its task vector lives.
# The factors come from the seeded randomized SVD (prepare time only; both paths share them).
RANK = 64
CPU_MODEL = dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, vocab_size=8192,
                 num_attention_heads=12, num_key_value_heads=12)
GPU_MODEL = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, vocab_size=32000,
                 num_attention_heads=16, num_key_value_heads=16)
TASKS = ("code", "sql", "shell")


# ----------------------------------------------------------------- measuring reads


class OpenWatch:
    """Which files under some folders are opened (Linux inotify), by any code in any thread.

    Counting opens, not read() calls, because safetensors maps files into memory.
    """

    IN_OPEN = 0x00000020

    def __init__(self, roots: list[Path]):
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._dirs: dict[int, Path] = {}
        for root in roots:
            for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
                wd = self._libc.inotify_add_watch(self._fd, str(d).encode(), self.IN_OPEN)
                if wd >= 0:
                    self._dirs[wd] = d

    def drain(self) -> set[Path]:
        """Files opened since the last drain."""
        opened: set[Path] = set()
        while True:
            try:
                buf = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return opened
            i = 0
            while i < len(buf):
                wd, _mask, _cookie, length = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16 : i + 16 + length].rstrip(b"\0").decode()
                if name and wd in self._dirs:
                    opened.add(self._dirs[wd] / name)
                i += 16 + length

    def close(self) -> None:
        os.close(self._fd)


def _weight_bytes(files: set[Path]) -> int:
    return sum(f.stat().st_size for f in files if f.suffix == ".safetensors" and f.exists())


# ----------------------------------------------------------------- models on disk


def _save_family(root: Path, arch: dict, dtype: torch.dtype) -> dict[str, Path]:
    """A random Llama base and three experts (base + low-rank + noise task vectors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=512, tie_word_embeddings=False, **arch)
    model = LlamaForCausalLM(config).to(dtype)
    paths = {"base": root / "base"}
    model.save_pretrained(paths["base"])
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for task in TASKS:
            for name, p in model.state_dict().items():
                w = base[name].float()
                if w.ndim == 2:
                    delta = torch.randn(w.shape[0], 16, generator=gen) @ torch.randn(16, w.shape[1], generator=gen)
                    delta += 0.5 * torch.randn(w.shape, generator=gen) * delta.std()
                else:
                    delta = torch.randn(w.shape, generator=gen)
                p.copy_((w + 0.05 * w.norm() * delta / delta.norm()).to(dtype))
            paths[task] = root / f"expert_{task}"
            model.save_pretrained(paths[task])
    return paths


# ----------------------------------------------------------------- the two paths


def _draws(gen: torch.Generator, factors: Factors, ccfg: CrossoverConfig, mcfg: MutationConfig):
    w = torch.normal(1.0 + ccfg.mu, ccfg.sigma, size=(2,), generator=gen)
    scales = {n: torch.rand(factors.ranks[n], generator=gen) * mcfg.rate for n in factors.svd_names}
    return w, scales


@torch.no_grad()
def reference_child(
    parent_dirs: list[Path], base_params: dict, engine, factors: Factors, q: int, gen: torch.Generator,
    ccfg: CrossoverConfig, mcfg: MutationConfig, dtype: torch.dtype, times: dict,
) -> None:
    """The official code's child: checkpoints in, merged + mutated state dict into the engine."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    ft_params = [AutoModelForCausalLM.from_pretrained(p, dtype=dtype).state_dict() for p in parent_dirs]
    t1 = time.perf_counter()
    task_vectors = [{k: ft[k] - base_params[k] for k in base_params} for ft in ft_params]
    del ft_params
    w, scales = _draws(gen, factors, ccfg, mcfg)
    merged = {}
    for k in task_vectors[0]:
        merged[k] = torch.zeros_like(task_vectors[0][k])
        for i in range(len(task_vectors)):
            merged[k] += w[i] * task_vectors[i][k]
        merged[k] /= w.sum()
    del task_vectors
    child = {k: base_params[k] + merged[k] for k in base_params}
    del merged
    t2 = time.perf_counter()
    dev = next(engine.parameters()).device
    for k in factors.svd_names:  # the official mutator, on the engine's device like the official code
        u, s, vt = factors.svd_of(k, q)
        u, vt = u.to(dev), vt.to(dev)
        diag = torch.diag_embed(scales[k].to(dev) * s.to(dev)).to(u.dtype)
        child[k] += (u @ diag @ vt).to(child[k])
    t3 = time.perf_counter()
    engine.load_state_dict(child, strict=False)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t4 = time.perf_counter()
    for stage, dt in (("load_parents", t1 - t0), ("merge", t2 - t1), ("mutate", t3 - t2), ("load_state_dict", t4 - t3)):
        times.setdefault(stage, []).append(dt)


@torch.no_grad()
def genome_child(
    parents: list[Genome], engine_state: dict, factors: Factors, q: int, gen: torch.Generator,
    ccfg: CrossoverConfig, mcfg: MutationConfig,
) -> Genome:
    """cycleqd's child: operators on genomes, then one fused pass into the engine's tensors."""
    child = svd(linear(parents, ccfg, gen, factors), q, mcfg, gen, factors)
    materialize(child, factors, into=engine_state)
    if factors.device.type == "cuda":
        torch.cuda.synchronize()
    return child


# ----------------------------------------------------------------- driver


def _measure(arch: dict, *, device: str, dtype: torch.dtype, repeats: int, workdir: Path) -> dict:
    """Build the models under ``workdir`` and time both child paths ``repeats`` times (after one warm-up)."""
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    fam = _save_family(workdir, arch, dtype)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    factors = Factors.build(fam["base"], {k: fam[k] for k in TASKS}, dtype=str(dtype).removeprefix("torch."),
                            rank=RANK, device=device, progress=False, svd_method="randomized")
    prepare_s = time.perf_counter() - t
    n_params = sum(x.numel() for x in factors.base.values())

    ccfg, mcfg = CrossoverConfig(), MutationConfig(rank=RANK)
    g = torch.Generator().manual_seed(0)
    seeds = [Genome.seed(k, factors) for k in range(3)]
    # Parents from an earlier search: their d is nonzero along all three experts.
    p1 = svd(linear([seeds[0], seeds[1]], ccfg, g, factors), 0, mcfg, g, factors)
    p2 = svd(linear([seeds[2], p1], ccfg, g, factors), 1, mcfg, g, factors)
    p2 = svd(p2, 2, mcfg, g, factors)
    parent_dirs = []
    engine = AutoModelForCausalLM.from_pretrained(fam["base"], dtype=dtype).to(device)
    for i, p in enumerate((p1, p2)):
        materialize(p, factors, into=engine.state_dict())
        parent_dirs.append(workdir / f"parent_{i}")
        engine.save_pretrained(parent_dirs[-1])
    ckpt_bytes = _weight_bytes(set(parent_dirs[0].glob("*.safetensors")))

    # The reference worker keeps the base state dict resident on the CPU, as the official one does.
    ref_engine = AutoModelForCausalLM.from_pretrained(fam["base"], dtype=dtype).to(device)
    base_params = {k: v.to("cpu") for k, v in factors.base.items()}
    engine_state = engine.state_dict()
    watch = OpenWatch([workdir])
    ref_times: dict[str, list[float]] = {}
    ours_s, ref_s, ref_read, ours_read, max_diff = [], [], [], [], 0.0
    q = 2
    for rep in range(repeats + 1):  # the first round warms caches and is not counted
        watch.drain()
        t = time.perf_counter()
        child = genome_child([p1, p2], engine_state, factors, q, torch.Generator().manual_seed(rep), ccfg, mcfg)
        dt_ours = time.perf_counter() - t
        opened_ours = watch.drain()
        stage_times: dict[str, list[float]] = {}
        t = time.perf_counter()
        reference_child(parent_dirs, base_params, ref_engine, factors, q, torch.Generator().manual_seed(rep),
                        ccfg, mcfg, dtype, stage_times)
        dt_ref = time.perf_counter() - t
        opened_ref = watch.drain()
        ours_sd, ref_sd = engine.state_dict(), ref_engine.state_dict()
        max_diff = max(max_diff, max(float((ours_sd[k].float() - ref_sd[k].float()).abs().max()) for k in factors.names))
        if rep == 0:
            continue
        ours_s.append(dt_ours)
        ref_s.append(dt_ref)
        ours_read.append(_weight_bytes(opened_ours))
        ref_read.append(_weight_bytes(opened_ref))
        for k, v in stage_times.items():
            ref_times.setdefault(k, []).extend(v)
    watch.close()
    gpath = workdir / "child.safetensors"
    child.save(gpath)
    genome_bytes = gpath.stat().st_size
    scale = max(float(v.abs().max()) for v in factors.base.values())
    ours_med, ref_med = statistics.median(ours_s), statistics.median(ref_s)
    return {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "params": n_params,
        "svd_rank": RANK,
        "svd_method": "randomized",
        "experts": len(TASKS),
        "repeats": repeats,
        "child_overhead_speedup": ref_med / ours_med,
        "reference_child_seconds": ref_med,
        "ours_child_seconds": ours_med,
        "reference_stage_seconds": {k: statistics.median(v) for k, v in ref_times.items()},
        "genome_storage_ratio": ckpt_bytes / genome_bytes,
        "checkpoint_bytes": ckpt_bytes,
        "genome_bytes": genome_bytes,
        "checkpoint_bytes_read_per_child": {"reference": int(statistics.median(ref_read)),
                                            "ours": int(statistics.median(ours_read))},
        "max_weight_diff_vs_reference": max_diff / scale,
        "prepare_seconds": prepare_s,
        "build_models_seconds": build_s,
        "resident_factor_bytes": factors.nbytes(),
        "torch_threads": torch.get_num_threads(),
    }


def bench_core(*, repeats: int = 3, gpu: bool | None = None, workdir: str | os.PathLike | None = None) -> dict:
    """Measure one child's overhead, genome vs reference path, on a ~100M random Llama (CPU, fp32).

    When CUDA is available (or ``gpu=True``) a ``"gpu"`` entry repeats it for a ~1B
    Llama in bfloat16: the genome path materialises on the device from resident
    tensors, the reference path goes through the CPU and host-to-device copies.

    Returns:
        dict with ``child_overhead_speedup`` (reference seconds / ours),
        ``genome_storage_ratio`` (checkpoint bytes / genome bytes),
        ``checkpoint_bytes_read_per_child`` and the baseline times.
    """
    gpu = torch.cuda.is_available() if gpu is None else gpu
    with tempfile.TemporaryDirectory(prefix="bench_core_", dir=workdir) as tmp:
        out = _measure(CPU_MODEL, device="cpu", dtype=torch.float32, repeats=repeats, workdir=Path(tmp) / "cpu")
    if gpu:
        with tempfile.TemporaryDirectory(prefix="bench_core_gpu_", dir=workdir) as tmp:
            out["gpu"] = _measure(GPU_MODEL, device="cuda", dtype=torch.bfloat16, repeats=repeats,
                                  workdir=Path(tmp) / "gpu")
    return out


def _print(result: dict) -> None:
    def line(r: dict, tag: str) -> None:
        print(
            f"[{tag}] {r['params'] / 1e6:.0f}M params {r['dtype']} rank {r['svd_rank']}: "
            f"child overhead reference {r['reference_child_seconds']:.3f}s vs ours {r['ours_child_seconds']:.3f}s "
            f"-> speedup {r['child_overhead_speedup']:.2f}x; storage {r['checkpoint_bytes']} B checkpoint / "
            f"{r['genome_bytes']} B genome = {r['genome_storage_ratio']:.0f}x; checkpoint bytes read per child "
            f"reference {r['checkpoint_bytes_read_per_child']['reference']} vs ours {r['checkpoint_bytes_read_per_child']['ours']}",
            file=sys.stderr,
        )

    line(result, "cpu")
    if "gpu" in result:
        line(result["gpu"], "gpu")


if __name__ == "__main__":
    res = bench_core()
    _print(res)
    print(json.dumps(res, indent=1))
