"""PEFT LoRA adapters as experts: reading them, checking them against the base, and their exact SVD.

A PEFT LoRA adapter of a base model changes module ``W`` (a ``[m, n]`` linear weight)
by ``tau = s B A`` with ``B`` ``[m, r]``, ``A`` ``[r, n]`` and the scale ``s = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA). Its SVD comes from the small side:

    B = Q_b R_b,  A^T = Q_a R_a,  s R_b R_a^T = U' diag(S) V'^T
    tau = (Q_b U') diag(S) (Q_a V')^T

two thin QRs and one ``r x r`` SVD per module, never a dense ``m x n`` matrix
(:func:`lora_svd`, :func:`lora_factors`). :meth:`cycleqd.model.factors.Factors.from_adapters`
holds these factors in place of dense task vectors; :mod:`cycleqd.model.lora` turns a child
back into an adapter.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from cycleqd.config import ConfigError
from cycleqd.model.experts import ModelInfo, inspect_model, resolve_model_dir

if TYPE_CHECKING:
    from cycleqd.config import Config

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


def is_adapter(path_or_id: str | os.PathLike, revision: str | None = None) -> bool:
    """Whether a local folder (or a Hub id, resolved) is a PEFT adapter (holds ``adapter_config.json``)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return (p / ADAPTER_CONFIG).is_file()
    if p.exists():
        return False
    return (resolve_model_dir(path_or_id, revision) / ADAPTER_CONFIG).is_file()


def expert_kind(cfg: "Config") -> str:
    """``"lora"`` when every expert of ``cfg`` is a PEFT adapter, ``"dense"`` when none is.

    Raises:
        ConfigError: a mix of adapters and full models (one line naming both kinds).
    """
    kinds = {t: is_adapter(cfg.models.experts[t], cfg.models.revision) for t in cfg.task_names}
    if all(kinds.values()):
        return "lora"
    if not any(kinds.values()):
        return "dense"
    lora = [t for t, v in kinds.items() if v]
    dense = [t for t, v in kinds.items() if not v]
    raise ConfigError(f"models.experts mixes LoRA adapters ({', '.join(lora)}) and full models "
                      f"({', '.join(dense)}): give all experts as adapters or all as full models")


def lora_svd(B: torch.Tensor, A: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD ``(U [m, r], S [r], V^T [r, n])`` of ``scale * B @ A`` through QRs of B and A^T.

    Computed in float32 (float64 inputs stay float64); costs O((m + n) r^2), never forms ``B @ A``.
    """
    dt = torch.float64 if B.dtype == torch.float64 else torch.float32
    qb, rb = torch.linalg.qr(B.to(dt))
    qa, ra = torch.linalg.qr(A.to(dt).t())
    um, s, vmh = torch.linalg.svd(scale * (rb @ ra.t()))
    return qb @ um, s, vmh @ qa.t()


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of an adapter: ``tau = scale * B @ A`` on the base tensor ``name``."""

    name: str
    A: torch.Tensor  # [r, n]
    B: torch.Tensor  # [m, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def _pattern_value(module: str, pattern: Mapping[str, float], default: float) -> float:
    # PEFT's rule: a pattern key matches a module whose name ends with it at a dot boundary.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter, read from ``adapter_config.json`` and ``adapter_model.safetensors``.

    Attributes:
        source: the folder or Hub id as given.
        dir: the resolved local folder.
        config: the adapter's config.
        modules: base tensor name (``...q_proj.weight``) -> :class:`LoraModule`.
    """

    source: str
    dir: Path
    config: dict
    modules: dict[str, LoraModule]

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def nbytes(self, itemsize: int = 4) -> int:
        return sum((m.A.numel() + m.B.numel()) * itemsize for m in self.modules.values())

    @classmethod
    def read(cls, path_or_id: str | os.PathLike, revision: str | None = None, *, load: bool = True) -> "LoraAdapter":
        """Read an adapter (with ``load=False``, shapes only: A and B are ``meta`` tensors).

        Raises:
            ConfigError: not a LoRA adapter, or one using what cycleqd cannot merge (DoRA,
                trained biases, embedding LoRA, extra saved modules).
        """
        d = resolve_model_dir(path_or_id, revision)
        who = f"adapter {str(path_or_id)!r}"
        cfg_file, weights = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
        if not cfg_file.is_file():
            raise ConfigError(f"{who}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
        try:
            config = json.loads(cfg_file.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from None
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise ConfigError(f"{who}: peft_type {config.get('peft_type')!r}; only LORA adapters are experts")
        if config.get("use_dora"):
            raise ConfigError(f"{who}: DoRA adapters are not linear task vectors; use plain LoRA")
        if config.get("bias", "none") != "none" or config.get("modules_to_save"):
            raise ConfigError(f"{who}: trained biases or modules_to_save are not supported (bias: none only)")
        if not weights.is_file():
            raise ConfigError(f"{who}: no {ADAPTER_WEIGHTS} (save the adapter with safetensors)")
        from safetensors import safe_open

        r0 = int(config.get("r", 8))
        alpha0 = float(config.get("lora_alpha", r0))
        rslora = bool(config.get("use_rslora", False))
        alphas = config.get("alpha_pattern") or {}
        sides: dict[str, dict[str, torch.Tensor]] = {}
        try:
            with safe_open(str(weights), framework="pt", device="cpu") as f:
                for key in f.keys():
                    m = _KEY.match(key)
                    if m is None or "lora_embedding" in key:
                        raise ConfigError(f"{who}: tensor {key!r} is not a LoRA A/B weight of a linear module "
                                          "(embedding LoRA and extra modules are not supported)")
                    if load:
                        t = f.get_tensor(key)
                    else:
                        t = torch.empty(f.get_slice(key).get_shape(), device="meta")  # shape only
                    sides.setdefault(m["module"], {})[m["side"]] = t
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors' errors do not name the file
            raise ConfigError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        modules = {}
        for module, ab in sorted(sides.items()):
            if set(ab) != {"A", "B"}:
                raise ConfigError(f"{who}: module {module!r} has lora_{''.join(ab)} only")
            r = int(ab["A"].shape[0])
            if int(ab["B"].shape[1]) != r:
                raise ConfigError(f"{who}: module {module!r}: lora_A has rank {r}, lora_B {ab['B'].shape[1]}")
            alpha = _pattern_value(module, alphas, alpha0)
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            modules[f"{module}.weight"] = LoraModule(f"{module}.weight", ab["A"], ab["B"], scale)
        if not modules:
            raise ConfigError(f"{who}: no LoRA weights")
        return cls(source=str(path_or_id), dir=d, config=config, modules=modules)

    def check_base(self, base: ModelInfo, task: str | None = None) -> None:
        """Check that this adapter was trained on ``base``: its recorded base model and every module's shape.

        The recorded ``base_model_name_or_path`` matches when it is the same string, the same
        folder, or names the same model (the same last path component, e.g. a Hub id and its
        local copy).

        Raises:
            ConfigError: one line naming the adapter, the expected base and what differs.
        """
        who = f"expert {task!r} (adapter {self.source})" if task else f"adapter {self.source}"
        rec = self.base_model
        if rec and not _same_model(rec, base):
            raise ConfigError(f"{who} was trained on {rec!r}, but models.base is {base.source!r}")
        for name, m in self.modules.items():
            shape = base.shapes.get(name)
            if shape is None:
                raise ConfigError(f"{who} adapts {name!r}, which the base ({base.source}) has no tensor for")
            want = (int(m.B.shape[0]), int(m.A.shape[1]))
            if len(shape) != 2 or want != tuple(shape):
                raise ConfigError(f"{who}: module {name!r} is {list(want)}, the base's tensor is {list(shape)}")


def _same_model(recorded: str, base: ModelInfo) -> bool:
    if recorded == base.source:
        return True
    p = Path(recorded).expanduser()
    if p.is_dir() and p.resolve() == base.dir.resolve():
        return True
    names = {Path(base.source.rstrip("/")).name.lower(), base.dir.name.lower(),
             str(base.config.get("_name_or_path", "")).rstrip("/").split("/")[-1].lower()}
    return recorded.rstrip("/").split("/")[-1].lower() in names


def read_experts(cfg_base: str, experts: Mapping[str, str], revision: str | None = None, *,
                 load: bool = True) -> tuple[ModelInfo, dict[str, LoraAdapter]]:
    """The base's headers and each expert adapter, checked against the base.

    Raises:
        ConfigError: unreadable adapter, or one trained on another base / with other shapes.
    """
    base = inspect_model(cfg_base, revision)
    adapters = {t: LoraAdapter.read(p, revision, load=load) for t, p in experts.items()}
    for t, ad in adapters.items():
        ad.check_base(base, t)
    return base, adapters


def lora_ranks(adapters: Sequence[LoraAdapter]) -> dict[str, int]:
    """Per targeted module, the largest rank among the adapters (the module's ``r_w``)."""
    ranks: dict[str, int] = {}
    for ad in adapters:
        for name, m in ad.modules.items():
            ranks[name] = max(ranks.get(name, 0), m.rank)
    return ranks


def lora_layout(task_names: Sequence[str], shapes: Mapping[str, Sequence[int]], ranks: Mapping[str, int]) -> str:
    """The layout hash of LoRA factors (as :meth:`Factors._layout`), from shapes and ranks alone."""
    spec = {
        "tasks": list(task_names),
        "tensors": [[n, list(shapes[n])] for n in sorted(shapes)],
        "ranks": [[n, int(ranks[n])] for n in sorted(ranks)],
    }
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def lora_factors(base: ModelInfo, adapters: Mapping[str, LoraAdapter], dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> tuple[dict, dict, dict, dict[str, list[int]]]:
    """Per adapted module, the K experts' exact factors side by side (``U`` ``[m, K r_w]``,
    ``S`` ``[K, r_w]`` float32, ``V^T`` ``[K r_w, n]``; ``r_w`` the largest rank there, the
    rest zero), and each expert's rank there (0: not targeted, a zero task vector)."""
    ranks = lora_ranks(list(adapters.values()))
    K = len(adapters)
    U, S, Vt, per = {}, {}, {}, {}
    for name in sorted(ranks):
        m, n = base.shapes[name]
        r = ranks[name]
        U[name] = torch.zeros((m, K * r), dtype=dtype, device=device)
        Vt[name] = torch.zeros((K * r, n), dtype=dtype, device=device)
        S[name] = torch.zeros((K, r), dtype=torch.float32)
        per[name] = [0] * K
        for k, ad in enumerate(adapters.values()):
            mod = ad.modules.get(name)
            if mod is None:
                continue
            u, s, vt = lora_svd(mod.B.to(device), mod.A.to(device), mod.scale)
            rk = mod.rank
            U[name][:, k * r : k * r + rk] = u.to(dtype)
            Vt[name][k * r : k * r + rk] = vt.to(dtype)
            S[name][k, :rk] = s.float().cpu()
            per[name][k] = rk
    return U, S, Vt, per


def adapter_plan_bytes(shapes: Mapping[str, Sequence[int]], ranks: Mapping[str, int], K: int, nbytes: int) -> int:
    """Bytes of K experts' LoRA factors (``U``, ``V`` in the factors' dtype, ``S`` in float32)."""
    return sum(K * (r * (shapes[n][0] + shapes[n][1]) * nbytes + r * 4) for n, r in ranks.items())


def default_targets(shapes: Mapping[str, Sequence[int]], modules: Sequence[str]) -> dict[str, int]:
    """The tensors a LoRA with ``target_modules`` names (suffixes like ``q_proj``) adapts, with no rank yet."""
    out = {}
    for n, s in shapes.items():
        if len(s) != 2 or "norm" in n or not n.endswith(".weight"):
            continue
        mod = n[: -len(".weight")]
        if any(mod == t or mod.endswith("." + t) for t in modules):
            out[n] = 0
    return out


LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_lora_plan(text: str) -> tuple[int, tuple[str, ...]]:
    """``"64"`` or ``"64:q_proj,v_proj"`` -> (rank, target modules); all linear modules by default.

    Raises:
        ConfigError: not RANK[:modules].
    """
    rank, _, mods = text.partition(":")
    try:
        r = int(rank)
    except ValueError:
        raise ConfigError(f"--lora {text!r}: expected RANK[:module,...], e.g. 64:q_proj,v_proj") from None
    if r < 1:
        raise ConfigError(f"--lora {text!r}: the rank must be at least 1")
    targets = tuple(m.strip() for m in mods.split(",") if m.strip()) or LINEAR_MODULES
    return r, targets

