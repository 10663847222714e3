"""The memory plan: what one worker holds, where it lives, and whether N workers fit.

Computed from the models' ``config.json`` and safetensors headers alone (no weight
is read), or, for a Hub id that is not on disk, from an architecture given as a
``config.json`` (``models.arch`` or ``cycleqd plan --arch``). Per worker:

* base weights, the K stacked task vectors, the SVD factors at the configured
  rank (full rank keeps one side only, see :mod:`cycleqd.model.factors`), in
  ``models.dtype``, where ``factors.device`` puts them;
* the engine's own copy of the weights and its KV cache, on the engine's device;
* the worker process itself (Python, torch, the engine's runtime), on the host.

``factors.device: auto`` resolves here: the engine's device when the plan fits
there, else host memory.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from cycleqd.config import ConfigError

if TYPE_CHECKING:
    from cycleqd.config import Config

GiB = 1024**3
# Resident size of a worker process before any model (interpreter, torch, Ray, the engine's runtime),
# measured on CPU: about 0.4 GiB with transformers, 1.2 GiB with vLLM.
_PROCESS_BYTES = {"transformers": int(0.5 * GiB), "vllm": int(1.5 * GiB)}
_DEFAULT_PROCESS_BYTES = int(0.5 * GiB)


@dataclass(frozen=True)
class PlanItem:
    """One thing a worker holds: its bytes and where it lives (``"cpu"`` or a device like ``"cuda"``)."""

    what: str
    bytes: int
    where: str


@dataclass(frozen=True)
class MemoryPlan:
    """A worker's memory, the totals for ``workers`` of them, and the verdict.

    Attributes:
        items: per-worker items.
        workers: how many workers the totals are for.
        engine_device: the engine's device type (``"cpu"``, ``"cuda"``).
        factors_device: where base, task vectors and factors live.
        device_bytes: memory of all engine devices together (None: unknown, or the engine runs on the CPU).
        host_bytes: the host's memory.
        shapes_known: False when the models were not on disk and no architecture was given.
        problem: why it does not fit, with what to change (None: it fits).
    """

    items: tuple[PlanItem, ...]
    workers: int
    engine_device: str
    factors_device: str
    device_bytes: int | None
    host_bytes: int
    shapes_known: bool = True
    problem: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def per_worker(self, where: str | None = None) -> int:
        """Bytes of one worker (on ``where`` only, if given)."""
        return sum(i.bytes for i in self.items if where is None or i.where == where)

    def total(self, where: str) -> int:
        return self.workers * self.per_worker(where)

    @property
    def fits(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict:
        return {
            "workers": self.workers,
            "per_worker": {i.what: {"bytes": i.bytes, "where": i.where} for i in self.items},
            "per_worker_bytes": self.per_worker(),
            "engine_device": self.engine_device,
            "factors_device": self.factors_device,
            "device": {"bytes": self.device_bytes, "needed": self.total(self.engine_device)
                       if self.engine_device != "cpu" else 0},
            "host": {"bytes": self.host_bytes, "needed": self.total("cpu")},
            "shapes_known": self.shapes_known,
            "fits": self.fits,
            "problem": self.problem,
            "notes": list(self.notes),
        }

    def format(self) -> str:
        """A plain-text table."""
        lines = [f"memory plan ({self.workers} worker(s); engine on {self.engine_device}, "
                 f"factors on {self.factors_device})"]
        for i in self.items:
            lines.append(f"  {i.what:22s} {gb(i.bytes):>10s}  on {i.where}")
        lines.append(f"  {'per worker':22s} {gb(self.per_worker()):>10s}")
        if self.engine_device != "cpu":
            cap = "unknown" if self.device_bytes is None else gb(self.device_bytes)
            lines.append(f"  {self.engine_device + ' total':22s} {gb(self.total(self.engine_device)):>10s}  of {cap}")
        lines.append(f"  {'host total':22s} {gb(self.total('cpu')):>10s}  of {gb(self.host_bytes)}")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  fits" if self.fits else f"  does not fit: {self.problem}")
        return "\n".join(lines)


def gb(n: int | float) -> str:
    """Bytes as decimal GB with 2 decimals (``"16.06 GB"``)."""
    return f"{n / 1e9:.2f} GB"


def parse_bytes(text: str) -> int:
    """``"80GB"``, ``"141 GiB"``, ``"512MB"`` or a plain number of bytes. Raises ConfigError."""
    t = text.strip().upper().replace(" ", "")
    units = {"GIB": GiB, "MIB": 1024**2, "TB": 10**12, "GB": 10**9, "MB": 10**6, "G": 10**9, "B": 1}
    for u, mult in units.items():
        if t.endswith(u):
            t, m = t[: -len(u)], mult
            break
    else:
        m = 1
    try:
        return int(float(t) * m)
    except ValueError:
        raise ConfigError(f"not a memory size: {text!r} (e.g. 80GB or 141GiB)") from None


def host_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def arch_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama-family decoder (Llama, Mistral, Qwen2 without biases) from its config.

    A tied ``lm_head`` is left out, as :func:`cycleqd.model.experts.inspect_model` does.

    Raises:
        ConfigError: a field the shapes need is missing.
    """
    try:
        H, L, V = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["vocab_size"])
        I, heads = int(config["intermediate_size"]), int(config["num_attention_heads"])
    except KeyError as e:
        raise ConfigError(f"architecture config lacks {e.args[0]!r}") from None
    kv = int(config.get("num_key_value_heads") or heads)
    hd = int(config.get("head_dim") or H // heads)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * hd, H), p + "self_attn.k_proj.weight": (kv * hd, H),
            p + "self_attn.v_proj.weight": (kv * hd, H), p + "self_attn.o_proj.weight": (H, heads * hd),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
        })
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (V, H)
    return shapes


def _read_arch(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"architecture config {path!r} not found (give a config.json or a model folder)")
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise ConfigError(f"architecture config {path!r} is not JSON") from None


def model_shapes(cfg: "Config", arch: str | None = None) -> tuple[dict[str, tuple[int, ...]], dict] | None:
    """``(shapes, config.json)`` of the base, from headers only; None if not on disk and no architecture.

    Raises:
        ConfigError: the base is a Hub id that is not on disk and no architecture was given.
    """
    arch = arch or cfg.models.arch
    if arch is not None:
        config = _read_arch(arch)
        return arch_shapes(config), config
    base = Path(cfg.models.base)
    if base.is_dir():
        from cycleqd.model.experts import inspect_model

        info = inspect_model(base)
        return info.shapes, info.config
    if cfg.models.mini is not None:
        return None  # built on first use
    raise ConfigError(f"models.base {cfg.models.base!r} is not a local folder: give its architecture with "
                      "--arch config.json (or models.arch in the config) to plan offline")


def _svd_bytes(m: int, n: int, rank: int | None, K: int, nbytes: int) -> int:
    r = min(m, n) if rank is None else min(rank, m, n)
    side = r * min(m, n) if r == min(m, n) else r * (m + n)  # full rank keeps the short side only
    return K * (side * nbytes + r * 4)


def _engine_device(cfg: "Config") -> str:
    dev = cfg.engine.device
    if dev == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return dev.split(":")[0]


def _device_capacity(engine_device: str) -> int | None:
    if engine_device == "cuda":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count() * torch.cuda.get_device_properties(0).total_memory
    return None


def memory_plan(
    cfg: "Config",
    *,
    workers: int | None = None,
    arch: str | None = None,
    device_bytes: int | None = None,
    host_bytes: int | None = None,
    factors_device: str | None = None,
    lora: "tuple[int, Sequence[str]] | None" = None,
) -> MemoryPlan:
    """The memory plan of ``cfg`` for ``workers`` workers (default ``evolution.workers``).

    LoRA experts (adapter folders on disk, or ``lora=(rank, target_modules)`` to plan them
    offline) are counted as the base plus the adapters' factors (``U``, ``V`` at each
    module's rank); the engine holds the base and one rank-``K r`` adapter per child it
    evaluates at once (``evolution.children_per_worker`` where the config has it).

    Args:
        arch: a config.json (or model folder) giving the architecture instead of the base's files.
        device_bytes: memory of the engine devices together (default: what CUDA reports here).
        host_bytes: the host's memory (default: this machine's).
        factors_device: overrides ``factors.device`` (``"auto"`` resolves as in a worker).

    Raises:
        ConfigError: the base cannot be planned offline (see :func:`model_shapes`).
    """
    from cycleqd.model.experts import torch_dtype

    workers = workers or cfg.evolution.workers
    eng_dev = _engine_device(cfg)
    dev_cap = device_bytes if device_bytes is not None else _device_capacity(eng_dev)
    host_cap = host_bytes if host_bytes is not None else host_memory()
    found = model_shapes(cfg, arch)
    shapes, mconfig = found if found is not None else ({}, {})
    K = len(cfg.tasks)
    fb = torch_dtype(cfg.models.dtype).itemsize
    eb = torch_dtype(cfg.engine.dtype or cfg.models.dtype).itemsize
    numel = sum(math.prod(s) for s in shapes.values())
    rank = cfg.evolution.mutation.rank
    svd = sum(_svd_bytes(s[0], s[1], rank, K, fb) for n, s in shapes.items() if len(s) == 2 and "norm" not in n)
    notes = []
    if found is None:
        notes.append("models not built yet: only the per-process memory is counted")

    # The engine's KV cache: vLLM reserves it up front; transformers grows it per batch (an upper bound here).
    L = int(mconfig.get("num_hidden_layers", 0))
    heads = int(mconfig.get("num_attention_heads", 1) or 1)
    kv_heads = int(mconfig.get("num_key_value_heads") or heads)
    hd = int(mconfig.get("head_dim") or (int(mconfig.get("hidden_size", 0)) // heads))
    max_len = int(cfg.engine.options.get("max_model_len") or min(int(mconfig.get("max_position_embeddings", 4096)),
                                                                  4096))
    per_token = 2 * L * kv_heads * hd * eb
    weights = numel * eb
    lranks = _lora_ranks(cfg, shapes, lora)
    child = 0
    if lranks is not None:
        from cycleqd.model.adapters import adapter_plan_bytes

        M = int(getattr(cfg.evolution, "children_per_worker", 1) or 1)
        child = M * sum(K * r * (shapes[n][0] + shapes[n][1]) for n, r in lranks.items()) * eb
    if cfg.engine.name == "vllm":
        if eng_dev == "cpu":
            kv = int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")) * GiB)
        else:
            util = float(cfg.engine.options.get("gpu_memory_utilization", 0.9))
            per_dev = (dev_cap or 0) / max(1, _gpus_per_process(cfg))
            # vLLM's LoRA slots come out of the same share of the GPU as its KV cache
            kv = max(int(util * per_dev) - weights - child, per_token * max_len) if dev_cap else per_token * max_len
    else:
        kv = per_token * max_len * cfg.engine.batch_size


    def items_for(fdev: str) -> tuple[PlanItem, ...]:
        if lranks is not None:
            return (
                PlanItem("base", numel * fb, fdev),
                PlanItem(f"lora factors (rank {max(lranks.values(), default=0)})",
                         adapter_plan_bytes(shapes, lranks, K, fb), fdev),
                PlanItem("engine weights", weights, eng_dev),
                PlanItem(f"engine adapters x{M}", child, eng_dev),
                PlanItem("engine kv cache", kv, eng_dev),
                PlanItem("process", _PROCESS_BYTES.get(cfg.engine.name, _DEFAULT_PROCESS_BYTES), "cpu"),
            )
        return (
            PlanItem("base", numel * fb, fdev),
            PlanItem("task vectors", K * numel * fb, fdev),
            PlanItem(f"svd factors (rank {rank or 'full'})", svd, fdev),
            PlanItem("engine weights", weights, eng_dev),
            PlanItem("engine kv cache", kv, eng_dev),
            PlanItem("process", _PROCESS_BYTES.get(cfg.engine.name, _DEFAULT_PROCESS_BYTES), "cpu"),
        )

    def problem_of(items: tuple[PlanItem, ...], n: int) -> str | None:
        host = n * sum(i.bytes for i in items if i.where == "cpu")
        if host > host_cap:
            return f"{n} worker(s) need {gb(host)} of host memory, the host has {gb(host_cap)}"
        if eng_dev != "cpu" and dev_cap is not None:
            dev = n * sum(i.bytes for i in items if i.where == eng_dev)
            if dev > dev_cap:
                return f"{n} worker(s) need {gb(dev)} on {eng_dev}, it has {gb(dev_cap)}"
        return None

    want = factors_device or cfg.factors.device
    if want == "auto":
        fdev = eng_dev if eng_dev == "cpu" or problem_of(items_for(eng_dev), workers) is None else "cpu"
    else:
        fdev = want.split(":")[0]
    items = items_for(fdev)
    problem = problem_of(items, workers)
    plan = MemoryPlan(items, workers, eng_dev, fdev, dev_cap, host_cap, found is not None, None, tuple(notes))
    if problem is not None:
        plan = replace(plan, problem=f"{problem}; {_advice(cfg, plan, items_for, problem_of, arch)}")
    return plan


def _lora_ranks(cfg: "Config", shapes: Mapping[str, tuple[int, ...]],
                lora: "tuple[int, Sequence[str]] | None") -> dict[str, int] | None:
    """Per adapted tensor, the largest expert rank; None for dense experts."""
    from cycleqd.model.adapters import ADAPTER_CONFIG, LoraAdapter, default_targets, lora_ranks

    if lora is not None:
        rank, targets = lora
        return {n: int(rank) for n in default_targets(shapes, targets)}
    paths = [Path(cfg.models.experts[t]) for t in cfg.task_names]
    if not paths or not all((p / ADAPTER_CONFIG).is_file() for p in paths):
        return None
    return lora_ranks([LoraAdapter.read(p, load=False) for p in paths])


def _gpus_per_process(cfg: "Config") -> int:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 1
    share = cfg.evolution.worker_gpus
    return max(1, round(n / share)) if share else 1


def _advice(cfg: "Config", plan: MemoryPlan, items_for, problem_of, arch: str | None) -> str:
    """The first single change that makes the plan fit: placement, rank, dtype, then fewer workers."""
    from cycleqd.config import edit_config

    n = plan.workers
    if plan.factors_device != "cpu" and problem_of(items_for("cpu"), n) is None:
        return "set factors.device: cpu (host memory, moved to the device tensor by tensor)"
    trials = []
    rank = cfg.evolution.mutation.rank
    for r in (1024, 256, 64, 16):
        if rank is None or r < rank:
            trials.append((f"lower evolution.mutation.rank to {r}", ("evolution", "mutation", "rank"), r))
    if cfg.models.dtype == "float32":
        trials.append(("use models.dtype: bfloat16 (half the bytes)", ("models", "dtype"), "bfloat16"))
    for text, path, value in trials:
        def change(data: dict, path: tuple = path, value: Any = value) -> None:
            node = data
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            if path[0] == "models" and cfg.engine.dtype is None:
                data["engine"]["dtype"] = value

        trial = memory_plan(edit_config(cfg, change), workers=n, device_bytes=plan.device_bytes,
                            host_bytes=plan.host_bytes, arch=arch, factors_device="auto")
        if trial.fits:
            return text
    for k in range(n - 1, 0, -1):
        if problem_of(plan.items, k) is None:
            return f"use at most {k} worker(s) (--workers {k})"
    return "use a machine with more memory, or a smaller model"


def check_plan(cfg: "Config", **kwargs) -> MemoryPlan:
    """:func:`memory_plan`, raising ConfigError (bad input: exit 2) with one line when it does not fit."""
    plan = memory_plan(cfg, **kwargs)
    if not plan.fits:
        raise ConfigError(f"memory plan does not fit: {plan.problem}")
    return plan


def factors_device(cfg: "Config", engine_device: "str | object") -> str:
    """Where a worker keeps its factors: ``factors.device``, with ``auto`` resolved by the plan."""
    want = cfg.factors.device
    if want != "auto":
        return want
    dev = str(engine_device)
    if dev.startswith("cpu"):
        return "cpu"
    try:
        plan = memory_plan(cfg, factors_device="auto")
    except ConfigError:
        return "cpu"
    return dev if plan.factors_device != "cpu" else "cpu"


def plan_json(plan: MemoryPlan) -> str:
    return json.dumps(plan.to_json(), indent=1)


