"""Task vectors and their SVD factors, resident in memory, with an on-disk cache.

For K experts of one base model, :class:`Factors` holds

* ``base[name]``: the base weight,
* ``tau[name]``: the task vectors stacked as ``[K, *shape]`` (``expert_k - base``),
* for every SVD weight (2-D tensors whose name has no ``"norm"``; this includes
  the token embeddings and ``lm_head``, as the official CycleQD mutation does),
  the SVD ``tau_k = U_k diag(S_k) V_k^T`` truncated to rank ``r``:
  ``U[name]`` is ``[m, K*r]`` (the K experts' ``U_k`` side by side), ``Vt[name]``
  is ``[K*r, n]`` and ``S[name]`` is ``[K, r]`` (float32, on the CPU).

``U`` and ``V`` are concatenated once here so that materialising a genome is one
matrix product per weight. Truncation only limits which directions mutation can
move along; the task vectors themselves stay exact.

At full rank (``r = min(m, n)``) storing ``tau``, ``U`` and ``V`` would hold the
task vector twice (``tau = U diag(S) V^T``). There the exact ``tau`` is kept with
the basis of the short side only (``U`` when ``m <= n``, else ``Vt``; the other
dict lacks the name): ``U^T tau = diag(S) V^T``, so the mutation term
``U diag(d) V^T = U diag(d / S) (U^T tau)`` needs no second side. Keeping ``tau``
(not the factors) leaves every seed expert bit-exact in any dtype.

SVDs are computed once and cached as safetensors under
``<cache>/<key>/``; the key hashes the model sources, revision, dtype, rank and
the weight files' sizes and modification times, so a changed checkpoint is never
served stale. Base and task vectors are rebuilt from the model files (one read).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from cycleqd.model.experts import ModelInfo, check_compatible, inspect_model, iter_tensors, torch_dtype

if TYPE_CHECKING:
    from cycleqd.config import Config

_CACHE_FORMAT = "cycleqd-factors-2"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def is_svd_weight(name: str, shape: Sequence[int]) -> bool:
    """Whether mutation acts on this tensor: 2-D and not a norm (embeddings and head included)."""
    return len(shape) == 2 and "norm" not in name


def _file_stamp(info: ModelInfo) -> list:
    stamp = []
    for f in sorted(set(info.files) | set(info.dir.glob("*.json"))):
        st = f.stat()
        stamp.append([f.name, st.st_size, st.st_mtime_ns])
    return stamp


def cache_key(
    base: ModelInfo,
    experts: Mapping[str, ModelInfo],
    *,
    dtype: str,
    rank: int | None,
    revision: str | None,
    method: str = "exact",
) -> str:
    """Hex key of everything the cached factors depend on."""
    payload = {
        "format": _CACHE_FORMAT,
        "base": [base.source, str(base.dir), _file_stamp(base)],
        "experts": [[t, e.source, str(e.dir), _file_stamp(e)] for t, e in experts.items()],
        "revision": revision,
        "dtype": dtype,
        "rank": rank,
        "method": method,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


class Factors:
    """Resident base weights, stacked task vectors and concatenated SVD factors.

    Build with :meth:`from_adapters` for LoRA experts: then ``low_rank`` is set and ``tau``
    is empty, because expert k's task vector on module w is exactly ``U_k diag(S_k) V_k^T``
    (rank ``r_k``, zero directions beyond it); ``svd_names`` are the adapted modules, with
    ``ranks[w] = max_k r_k``, and a genome's ``a[w, k]`` enters as ``a_k S_k`` next to ``d_k``
    (see :mod:`cycleqd.model.genome`). ``evolution.mutation.rank`` does not apply there: an
    adapter's rank is its own truncation.

    Build with :meth:`prepare` (from a config, cached) or :meth:`build`.

    Attributes:
        task_names: the K tasks, in the order of the task-vector axis.
        names: all tensor names, sorted; genome rows follow this order.
        svd_names: the SVD weights, sorted; mutation draws follow this order.
        ranks: SVD weight -> its rank r_w = min(rank, m, n).
        rank: the requested rank (None = full).
        key: cache key (None if not cached).
        svd_computed: how many SVDs this instance computed (0 when loaded from cache).
        low_rank: LoRA experts (no ``tau``; the factors are the task vectors).
        adapter_ranks: with ``low_rank``, per module each expert's rank there (0: not adapted).
        base_source: the base model as configured.
    """

    def __init__(
        self,
        *,
        task_names: Sequence[str],
        base: dict[str, torch.Tensor],
        tau: dict[str, torch.Tensor],
        U: dict[str, torch.Tensor],
        S: dict[str, torch.Tensor],
        Vt: dict[str, torch.Tensor],
        rank: int | None,
        key: str | None = None,
        svd_computed: int = 0,
        low_rank: bool = False,
        adapter_ranks: dict[str, list[int]] | None = None,
        base_source: str | None = None,
    ):
        self.task_names = list(task_names)
        self.base = base
        self.tau = tau
        self.U = U
        self.S = S
        self.Vt = Vt
        self.rank = rank
        self.key = key
        self.svd_computed = svd_computed
        self.low_rank = low_rank
        self.adapter_ranks = adapter_ranks or {}
        self.base_source = base_source
        self.names = sorted(base)
        self.svd_names = sorted(S)
        self.ranks = {n: int(S[n].shape[1]) for n in self.svd_names}
        self.index = {n: i for i, n in enumerate(self.names)}
        K = self.num_experts
        # Genome d is one flat vector: for each SVD weight, a [K, r_w] block.
        self.d_slices: dict[str, slice] = {}
        off = 0
        owner = []
        for n in self.svd_names:
            size = K * self.ranks[n]
            self.d_slices[n] = slice(off, off + size)
            owner.append(torch.full((size,), self.index[n], dtype=torch.long))
            off += size
        self.d_size = off
        self.d_owner = torch.cat(owner) if owner else torch.zeros(0, dtype=torch.long)
        self.groups, self.num_groups = self._layer_groups()
        self.layout = self._layout()

    @property
    def num_experts(self) -> int:
        return len(self.task_names)

    @property
    def num_tensors(self) -> int:
        return len(self.names)

    @property
    def device(self) -> torch.device:
        return next(iter(self.base.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.base.values())).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.base[name].shape)

    def _layer_groups(self) -> tuple[list[int], int]:
        # One group per decoder layer index; everything else (embeddings, final norm, head) shares one more.
        layer_ids = []
        for n in self.names:
            m = _LAYER.search(n)
            layer_ids.append(int(m.group(1)) if m else None)
        known = sorted({i for i in layer_ids if i is not None})
        pos = {i: j for j, i in enumerate(known)}
        rest = len(known)
        groups = [pos[i] if i is not None else rest for i in layer_ids]
        return groups, rest + (1 if any(i is None for i in layer_ids) else 0)

    def _layout(self) -> str:
        spec = {
            "tasks": self.task_names,
            "tensors": [[n, list(self.base[n].shape)] for n in self.names],
            "ranks": [[n, self.ranks[n]] for n in self.svd_names],
        }
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]

    def nbytes(self) -> int:
        """Bytes held by all resident tensors."""
        total = 0
        for group in (self.base, self.tau, self.U, self.S, self.Vt):  # tau is empty for LoRA experts
            total += sum(t.numel() * t.element_size() for t in group.values())
        return total

    def checkpoint_nbytes(self) -> int:
        """Bytes of one full model checkpoint in the resident dtype."""
        return sum(t.numel() * t.element_size() for t in self.base.values())

    def svd_of(self, name: str, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_k [m, r], S_k [r], V_k^T [r, n]) of expert k's task vector for ``name``.

        A side not stored (full rank) is derived from the task vector.
        """
        r = self.ranks[name]
        s = self.S[name][k]
        if self.low_rank:  # the factors are the task vector (zero beyond expert k's rank)
            return self.U[name][:, k * r : (k + 1) * r], s, self.Vt[name][k * r : (k + 1) * r]
        inv = torch.where(s > 0, 1.0 / s.clamp_min(1e-30), torch.zeros_like(s)).to(self.device)
        tau = self.tau[name][k].float()
        u = self.U[name][:, k * r : (k + 1) * r] if name in self.U else None
        vt = self.Vt[name][k * r : (k + 1) * r] if name in self.Vt else None
        if vt is None:
            vt = (inv[:, None] * (u.float().t() @ tau)).to(self.dtype)
        if u is None:
            u = ((tau @ vt.float().t()) * inv).to(self.dtype)
        return u, s, vt

    def stores_both_sides(self, name: str) -> bool:
        """Whether ``U`` and ``Vt`` are both stored for ``name`` (truncated rank) or one is derived (full)."""
        return name in self.U and name in self.Vt

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        base: str | os.PathLike,
        experts: Mapping[str, str | os.PathLike],
        *,
        dtype: str = "float32",
        rank: int | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
        svd_method: str = "exact",
    ) -> "Factors":
        """Load base and experts, form task vectors, and compute or load the SVD factors.

        Args:
            base: base model folder or Hub id.
            experts: task name -> expert folder or Hub id (the order is the task axis).
            dtype: dtype of the resident base / task vectors / U / V (SVDs run in float32).
            rank: SVD rank per expert and weight (None = full).
            cache_dir: where SVD factors are cached (None = no cache).
            device: where the resident tensors live (SVDs run there too).
            svd_method: ``"exact"`` (``torch.linalg.svd``, then truncated) or, with a
                rank, ``"randomized"`` (seeded subspace iteration for the top ``rank``
                directions: O(m*n*rank) instead of O(m*n*min(m, n)); accurate where the
                task vector's spectrum has a gap after ``rank``, as fine-tunes' do).

        Raises:
            ConfigError: a model is missing or the experts do not match the base.
        """
        dt = torch_dtype(dtype)
        if svd_method not in ("exact", "randomized"):
            raise ValueError(f"svd_method must be 'exact' or 'randomized', got {svd_method!r}")
        if svd_method == "randomized" and rank is None:
            raise ValueError("svd_method='randomized' needs a rank")
        base_info = inspect_model(base, revision)
        expert_infos = {t: inspect_model(p, revision) for t, p in experts.items()}
        check_compatible(base_info, expert_infos)
        key = cache_key(base_info, expert_infos, dtype=str(dtype), rank=rank, revision=revision, method=svd_method)

        base_sd = dict(iter_tensors(base_info, dt, device))
        K = len(expert_infos)
        tau = {n: torch.empty((K, *t.shape), dtype=dt, device=device) for n, t in base_sd.items()}
        # Stream each expert tensor by tensor: never a second full model in memory.
        for k, info in enumerate(expert_infos.values()):
            for name, t in iter_tensors(info, dt, device):
                torch.sub(t, base_sd[name], out=tau[name][k])
                del t

        svd_names = sorted(n for n, t in base_sd.items() if is_svd_weight(n, t.shape))
        target = Path(cache_dir) / key if cache_dir is not None else None
        if target is not None and (target / "meta.json").is_file():
            U, S, Vt = _load_cache(target, svd_names, dt, device)
            computed = 0
        else:
            U, S, Vt = _compute_svds(tau, svd_names, rank, dt, progress, svd_method)
            computed = K * len(svd_names)
            if target is not None:
                _save_cache(target, U, S, Vt, {
                    "format": _CACHE_FORMAT,
                    "base": str(base),
                    "experts": {t: str(p) for t, p in experts.items()},
                    "dtype": str(dtype),
                    "rank": rank,
                    "revision": revision,
                    "svd_method": svd_method,
                })
        return cls(
            task_names=list(expert_infos), base=base_sd, tau=tau, U=U, S=S, Vt=Vt,
            rank=rank, key=key if target is not None else None, svd_computed=computed,
        )

    @classmethod
    def from_adapters(
        cls,
        base: str | os.PathLike,
        experts: Mapping[str, str | os.PathLike],
        *,
        dtype: str = "float32",
        revision: str | None = None,
        device: str | torch.device = "cpu",
    ) -> "Factors":
        """Low-rank factors of PEFT LoRA experts: the base, and each adapted module's exact SVD
        from the adapters' A and B (:func:`cycleqd.model.adapters.lora_factors`; no dense task
        vector, no cache needed: a few milliseconds per module).

        Raises:
            ConfigError: an adapter is unreadable, or was trained on another base.
        """
        from cycleqd.model.adapters import lora_factors, read_experts

        dt = torch_dtype(dtype)
        base_info, adapters = read_experts(str(base), {t: str(p) for t, p in experts.items()}, revision)
        base_sd = dict(iter_tensors(base_info, dt, device))
        U, S, Vt, per = lora_factors(base_info, adapters, dt, device)
        return cls(task_names=list(adapters), base=base_sd, tau={}, U=U, S=S, Vt=Vt, rank=None,
                   svd_computed=sum(1 for v in per.values() for r in v if r), low_rank=True,
                   adapter_ranks=per, base_source=str(base))

    def pin_memory(self) -> "Factors":
        """Page-lock the host tensors (where CUDA exists), so copies to the device run asynchronously."""
        if self.device.type == "cpu" and torch.cuda.is_available():
            for group in (self.base, self.tau, self.U, self.Vt):
                for n in list(group):
                    group[n] = group[n].pin_memory()
        return self

    @classmethod
    def prepare(
        cls, cfg: "Config", *, device: str | torch.device = "cpu", progress: bool = True,
        svd_method: str | None = None,
    ) -> "Factors":
        """Factors for an experiment config, cached under ``cfg.prepare_cache``.

        Experts are taken in the config's task order; the SVD rank is
        ``cfg.evolution.mutation.rank``, the method ``cfg.factors.svd_method`` unless
        given. A second call with unchanged models loads the SVD factors from the
        cache instead of recomputing them.
        """
        from cycleqd.model.adapters import expert_kind

        if expert_kind(cfg) == "lora":
            return cls.from_adapters(cfg.models.base, {t: cfg.models.experts[t] for t in cfg.task_names},
                                     dtype=cfg.models.dtype, revision=cfg.models.revision, device=device)
        svd_method = svd_method or cfg.factors.svd_method
        return cls.build(
            cfg.models.base,
            {t: cfg.models.experts[t] for t in cfg.task_names},
            dtype=cfg.models.dtype,
            rank=cfg.evolution.mutation.rank,
            revision=cfg.models.revision,
            cache_dir=cfg.prepare_cache,
            device=device,
            progress=progress,
            svd_method=svd_method,
        )


def warm_cache(cfg: "Config", *, progress: bool = True) -> Path:
    """Make sure the SVD factors of ``cfg`` are cached, and return the cache folder.

    When the cache is already there nothing is loaded (the key comes from headers
    and file stamps); otherwise the factors are computed on the CPU, written and
    dropped, so that workers load them instead of racing to compute them.
    """
    from cycleqd.model.adapters import expert_kind

    if expert_kind(cfg) == "lora":  # LoRA factors are not cached: a few milliseconds per module
        return Path(cfg.prepare_cache)
    base = inspect_model(cfg.models.base, cfg.models.revision)
    experts = {t: inspect_model(cfg.models.experts[t], cfg.models.revision) for t in cfg.task_names}
    key = cache_key(base, experts, dtype=str(cfg.models.dtype), rank=cfg.evolution.mutation.rank,
                    revision=cfg.models.revision, method=cfg.factors.svd_method)
    target = Path(cfg.prepare_cache) / key
    if not (target / "meta.json").is_file():
        Factors.prepare(cfg, device="cpu", progress=progress)
    return target


def prepare_command(cfg: "Config") -> Path:
    """``cycleqd prepare``: fill the factor cache for ``cfg`` and return its folder."""
    return warm_cache(cfg, progress=True)


def randomized_svd(
    x: torch.Tensor, rank: int, *, oversample: int = 16, iters: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD ``(U [m, r], S [r], V^T [r, n])`` by seeded randomized subspace iteration.

    Deterministic for a given seed and device. Re-orthonormalises at every step so
    small singular values do not drown in rounding.
    """
    m, n = x.shape
    q = min(rank + oversample, m, n)
    g = torch.Generator(device=x.device).manual_seed(seed)
    basis, _ = torch.linalg.qr(x @ torch.randn(n, q, generator=g, device=x.device, dtype=x.dtype))
    for _ in range(iters):
        z, _ = torch.linalg.qr(x.T @ basis)
        basis, _ = torch.linalg.qr(x @ z)
    ub, s, vh = torch.linalg.svd(basis.T @ x, full_matrices=False)
    r = min(rank, q)
    return (basis @ ub[:, :r]), s[:r], vh[:r]


def _compute_svds(
    tau: dict[str, torch.Tensor], svd_names: list[str], rank: int | None, dt: torch.dtype, progress: bool,
    method: str = "exact",
) -> tuple[dict, dict, dict]:
    from tqdm.auto import tqdm

    U: dict[str, torch.Tensor] = {}
    S: dict[str, torch.Tensor] = {}
    Vt: dict[str, torch.Tensor] = {}
    K = next(iter(tau.values())).shape[0] if tau else 0
    bar = tqdm(total=K * len(svd_names), desc="SVD of task vectors", unit="svd", disable=not progress)
    with _lapack_threads(tau):
        _svd_loop(tau, svd_names, rank, dt, method, bar, U, S, Vt)
    bar.close()
    return U, S, Vt


@contextlib.contextmanager
def _lapack_threads(tau: dict[str, torch.Tensor]):
    """One CPU thread per decomposition.

    Threaded LAPACK gains little at these sizes and collapses (10-20x slower, from
    spinning OpenMP workers) when the cores are shared with other processes.
    """
    on_cpu = bool(tau) and next(iter(tau.values())).device.type == "cpu"
    before = torch.get_num_threads()
    if on_cpu:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if on_cpu:
            torch.set_num_threads(before)


def _svd_loop(
    tau: dict, svd_names: list[str], rank: int | None, dt: torch.dtype, method: str, bar, U: dict, S: dict, Vt: dict
) -> None:
    K = next(iter(tau.values())).shape[0] if tau else 0
    for name in svd_names:
        t = tau[name]
        m, n = t.shape[1:]
        r = min(m, n) if rank is None else min(rank, m, n)
        # At full rank one side is derived from tau (module docstring): store the short side only.
        keep_u = r < min(m, n) or m <= n
        keep_vt = r < min(m, n) or m > n
        u_cat = torch.empty((m, K * r), dtype=dt, device=t.device) if keep_u else None
        vt_cat = torch.empty((K * r, n), dtype=dt, device=t.device) if keep_vt else None
        s_all = torch.empty((K, r), dtype=torch.float32)
        for k in range(K):
            if not bool(t[k].any()):  # an untouched weight: no directions to mutate along
                if keep_u:
                    u_cat[:, k * r : (k + 1) * r] = 0
                if keep_vt:
                    vt_cat[k * r : (k + 1) * r] = 0
                s_all[k] = 0
                bar.update(1)
                continue
            if method == "randomized" and r < min(m, n):
                u, s, vh = randomized_svd(t[k].float(), r)
            else:
                u, s, vh = torch.linalg.svd(t[k].float(), full_matrices=False)
            if keep_u:
                u_cat[:, k * r : (k + 1) * r] = u[:, :r]
            if keep_vt:
                vt_cat[k * r : (k + 1) * r] = vh[:r]
            s_all[k] = s[:r].cpu()
            del u, s, vh
            bar.update(1)
        S[name] = s_all
        if keep_u:
            U[name] = u_cat
        if keep_vt:
            Vt[name] = vt_cat


def _save_cache(target: Path, U: dict, S: dict, Vt: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # a folder without meta.json is an interrupted or foreign write
        shutil.rmtree(target, ignore_errors=True)
    # Write into a sibling temp folder and rename: a crash never leaves a half cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tensors = {}
        for n in S:
            tensors[f"{n}.S"] = S[n].contiguous()
            if n in U:
                tensors[f"{n}.U"] = U[n].contiguous().cpu()
            if n in Vt:
                tensors[f"{n}.Vt"] = Vt[n].contiguous().cpu()
        save_file(tensors, str(tmp / "svd.safetensors"), metadata={"format": _CACHE_FORMAT})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:  # another process filled the cache first
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_cache(
    target: Path, svd_names: list[str], dt: torch.dtype, device: str | torch.device
) -> tuple[dict, dict, dict]:
    from safetensors import safe_open

    U, S, Vt = {}, {}, {}
    with safe_open(str(target / "svd.safetensors"), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        for n in svd_names:
            S[n] = f.get_tensor(f"{n}.S").float()
            if f"{n}.U" in keys:
                U[n] = f.get_tensor(f"{n}.U").to(device=device, dtype=dt)
            if f"{n}.Vt" in keys:
                Vt[n] = f.get_tensor(f"{n}.Vt").to(device=device, dtype=dt)
    return U, S, Vt
