"""Genomes: a model as coefficients over the experts' task vectors and SVD factors.

Every model that linear crossover and expert-basis SVD mutation can produce is

    theta[t] = base[t] + sum_k a[t, k] * tau_k[t] + sum_k U_k[t] diag(d[t, k]) V_k[t]^T

so a :class:`Genome` stores ``a`` (``[T, K]``, one row per tensor in
``Factors.names`` order) and ``d`` (one flat float32 vector; for each SVD weight
in ``Factors.svd_names`` order a ``[K, r_w]`` block, see ``Factors.d_slices``).
Operators that are not linear in the experts add a stored *term*:

* :class:`NoiseTerm`: seeded Gaussian noise, ``coef[t] * std * N(0, 1)``,
  regenerated from its seed when materialised (Gaussian mutation stays a few bytes);
* :class:`DeltaTerm`: full tensors kept in the genome (TIES, DARE, a child's own
  SVD ...), ``coef[t] * delta[t]``.

Terms are linear too once made, so crossover scales their coefficients and
merges terms with the same identity.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence, Union

import torch

from cycleqd.atomic import write_atomic

if TYPE_CHECKING:
    from cycleqd.model.factors import Factors

_FORMAT = "cycleqd-genome"
_VERSION = "1"


def _noise_seed(seed: int, t: int) -> int:
    # A distinct, reproducible stream per tensor, so any tensor can be regenerated alone.
    h = hashlib.blake2b(f"{seed}:{t}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@dataclass(frozen=True, eq=False)
class NoiseTerm:
    """Seeded Gaussian noise ``coef[t] * std * N(0, 1)`` on every tensor t.

    The noise of tensor t comes from a generator on the factors' device seeded
    from ``(seed, t)``: the same genome gives the same weights on the same device
    type (CPU and CUDA random streams differ).
    """

    seed: int
    std: float
    coef: torch.Tensor  # [T] float32

    @property
    def identity(self) -> tuple:
        return ("noise", self.seed, self.std)

    def meta(self) -> dict:
        return {"kind": "noise", "seed": self.seed, "std": self.std}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, out: torch.Tensor, t: int, name: str) -> None:
        c = float(self.coef[t])
        if c == 0.0:
            return
        g = torch.Generator(device=out.device).manual_seed(_noise_seed(self.seed, t))
        noise = torch.randn(out.shape, generator=g, device=out.device, dtype=torch.float32)
        out.add_(noise.to(out.dtype), alpha=c * self.std)


@dataclass(frozen=True, eq=False)
class DeltaTerm:
    """A stored full-tensor term ``coef[t] * delta[name]`` (tensors absent from ``delta`` are 0).

    ``id`` is a content hash; two terms with the same id are the same term.
    """

    id: str
    delta: Mapping[str, torch.Tensor]
    coef: torch.Tensor  # [T] float32

    @classmethod
    def create(cls, delta: Mapping[str, torch.Tensor], factors: "Factors") -> "DeltaTerm":
        """A term holding ``delta`` (float32 CPU copies) with coefficient 1 everywhere."""
        h = hashlib.sha256()
        kept = {}
        for name in sorted(delta):
            if name not in factors.index:
                raise KeyError(f"delta term: {name!r} is not a tensor of these factors")
            x = delta[name].detach().to("cpu", torch.float32).contiguous()
            h.update(name.encode())
            h.update(x.numpy().tobytes())
            kept[name] = x
        return cls(id=h.hexdigest()[:24], delta=kept, coef=torch.ones(factors.num_tensors))

    @property
    def identity(self) -> tuple:
        return ("delta", self.id)

    def meta(self) -> dict:
        return {"kind": "delta", "id": self.id}

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.delta)

    def apply(self, out: torch.Tensor, t: int, name: str) -> None:
        c = float(self.coef[t])
        x = self.delta.get(name)
        if x is None or c == 0.0:
            return
        out.add_(x.to(device=out.device, dtype=out.dtype), alpha=c)


Term = Union[NoiseTerm, DeltaTerm]


@dataclass(frozen=True, eq=False)
class Genome:
    """Coefficients of one model over the resident factors (see module docstring).

    Attributes:
        a: ``[T, K]`` float32, task-vector coefficient per tensor and expert.
        d: ``[D]`` float32, SVD coefficients (``Factors.d_slices`` gives each weight's ``[K, r_w]`` block).
        layout: ``Factors.layout`` of the factors this genome belongs to.
        terms: stored non-linear terms.
    """

    a: torch.Tensor
    d: torch.Tensor
    layout: str
    terms: tuple[Term, ...] = field(default_factory=tuple)

    # --------------------------------------------------------------- construction

    @classmethod
    def seed(cls, k: int, factors: "Factors") -> "Genome":
        """Expert k itself: ``a[:, k] = 1``, everything else 0."""
        K = factors.num_experts
        if not 0 <= k < K:
            raise IndexError(f"expert index {k} out of range for {K} experts")
        a = torch.zeros(factors.num_tensors, K)
        a[:, k] = 1.0
        return cls(a=a, d=torch.zeros(factors.d_size), layout=factors.layout)

    @classmethod
    def base(cls, factors: "Factors") -> "Genome":
        """The base model: all coefficients 0."""
        return cls(
            a=torch.zeros(factors.num_tensors, factors.num_experts),
            d=torch.zeros(factors.d_size),
            layout=factors.layout,
        )

    @staticmethod
    def combine(
        genomes: Sequence["Genome"],
        weights: Sequence[float | torch.Tensor],
        *,
        factors: "Factors | None" = None,
    ) -> "Genome":
        """Weighted sum ``sum_i w_i * g_i`` of genomes (callers normalise the weights).

        Args:
            genomes: at least one genome, all of one layout.
            weights: one per genome: a float, or a ``[T]`` tensor of per-tensor weights
                (then ``factors`` is required, to spread them over ``d``).

        Raises:
            ValueError: empty input, length mismatch or mixed layouts.
        """
        if not genomes or len(genomes) != len(weights):
            raise ValueError(f"combine needs one weight per genome, got {len(genomes)} and {len(weights)}")
        layout = genomes[0].layout
        if any(g.layout != layout for g in genomes):
            raise ValueError("combine: genomes come from different factors (layouts differ)")
        a = torch.zeros_like(genomes[0].a)
        d = torch.zeros_like(genomes[0].d)
        coefs: dict[tuple, torch.Tensor] = {}
        firsts: dict[tuple, Term] = {}
        for g, w in zip(genomes, weights):
            if isinstance(w, torch.Tensor) and w.ndim == 1:
                if factors is None:
                    raise ValueError("combine: per-tensor weights need factors=")
                wt = w.to(torch.float32)
                a.add_(g.a * wt[:, None])
                d.add_(g.d * wt[factors.d_owner])
            else:
                wt = float(w)
                a.add_(g.a, alpha=wt)
                d.add_(g.d, alpha=wt)
            for term in g.terms:
                key = term.identity
                firsts.setdefault(key, term)
                coefs[key] = coefs.get(key, 0.0) + term.coef * wt
        terms = tuple(
            replace(firsts[key], coef=torch.as_tensor(c, dtype=torch.float32))
            for key, c in coefs.items()
            if bool(torch.as_tensor(c).ne(0).any())
        )
        return Genome(a=a, d=d, layout=layout, terms=terms)

    def with_term(self, term: Term) -> "Genome":
        """This genome plus a term (coefficients add up if the same term is already there)."""
        terms = list(self.terms)
        for i, old in enumerate(terms):
            if old.identity == term.identity:
                terms[i] = replace(old, coef=old.coef + term.coef)
                return replace(self, terms=tuple(terms))
        return replace(self, terms=(*terms, term))

    def check(self, factors: "Factors") -> None:
        """Raise ValueError unless this genome was made for ``factors``."""
        if self.layout != factors.layout:
            raise ValueError(
                f"genome layout {self.layout} does not match the factors ({factors.layout}): "
                "other base/experts, tensor set or SVD rank"
            )

    # ----------------------------------------------------------------- storage

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this genome stores (its serialized size is this plus a small header)."""
        total = self.a.numel() * 4 + self.d.numel() * 4
        for term in self.terms:
            total += term.coef.numel() * 4
            total += sum(x.numel() * x.element_size() for x in term.tensors().values())
        return total

    def _tensors_and_meta(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {"a": self.a.float().contiguous(), "d": self.d.float().contiguous()}
        metas = []
        for i, term in enumerate(self.terms):
            tensors[f"term{i}.coef"] = term.coef.float().contiguous()
            for name, x in term.tensors().items():
                tensors[f"term{i}.delta.{name}"] = x.contiguous()
            metas.append(term.meta())
        meta = {"format": _FORMAT, "version": _VERSION, "layout": self.layout, "terms": json.dumps(metas)}
        return tensors, meta

    def to_bytes(self) -> bytes:
        """Serialize as a safetensors blob (metadata carries layout and term descriptions)."""
        from safetensors.torch import save

        tensors, meta = self._tensors_and_meta()
        blob = save(tensors, metadata=meta)
        # safetensors writes the header's maps in hash order: rewrite it with sorted keys, so that
        # one genome always has the same bytes (data offsets are relative to the data, unchanged)
        n = int.from_bytes(blob[:8], "little")
        header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        return len(header).to_bytes(8, "little") + header + blob[8 + n:]

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Genome":
        """Inverse of :meth:`to_bytes`. Raises ValueError for a blob that is not a genome."""
        from safetensors.torch import load

        if len(blob) < 8:
            raise ValueError("not a genome: blob too short")
        (n,) = struct.unpack("<Q", blob[:8])
        try:
            header = json.loads(blob[8 : 8 + n])
        except ValueError:
            raise ValueError("not a genome: bad safetensors header") from None
        return cls._from_parts(load(blob), header.get("__metadata__") or {})

    @classmethod
    def _from_parts(cls, tensors: dict[str, torch.Tensor], meta: Mapping[str, str]) -> "Genome":
        if meta.get("format") != _FORMAT:
            raise ValueError(f"not a genome (format {meta.get('format')!r})")
        terms: list[Term] = []
        for i, m in enumerate(json.loads(meta.get("terms", "[]"))):
            coef = tensors[f"term{i}.coef"]
            if m["kind"] == "noise":
                terms.append(NoiseTerm(seed=int(m["seed"]), std=float(m["std"]), coef=coef))
            elif m["kind"] == "delta":
                prefix = f"term{i}.delta."
                delta = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                terms.append(DeltaTerm(id=m["id"], delta=delta, coef=coef))
            else:
                raise ValueError(f"unknown genome term kind {m['kind']!r}")
        return cls(a=tensors["a"], d=tensors["d"], layout=meta["layout"], terms=tuple(terms))

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` (a .safetensors file) atomically."""
        write_atomic(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Genome":
        """Read a genome written by :meth:`save`."""
        return cls.from_bytes(Path(path).read_bytes())


# ---------------------------------------------------------------- materialise


def _active_range(block: torch.Tensor) -> tuple[int, int] | None:
    """First and one-past-last expert with a nonzero SVD coefficient, or None."""
    nz = block.ne(0).any(dim=1).nonzero().flatten()
    if nz.numel() == 0:
        return None
    return int(nz[0]), int(nz[-1]) + 1


def _svd_update(buf: torch.Tensor, factors: "Factors", name: str, d: torch.Tensor, d_cpu: torch.Tensor,
                dev: torch.device) -> None:
    """``buf += sum_k U_k diag(d_k) V_k^T`` over the experts whose ``d_k`` is nonzero."""
    K, r = factors.num_experts, factors.ranks[name]
    sl = factors.d_slices[name]
    span = _active_range(d_cpu[sl].view(K, r))
    if span is None:
        return
    k0, k1 = span
    coef = d[sl][k0 * r : k1 * r]
    U, Vt = factors.U.get(name), factors.Vt.get(name)
    if U is not None and Vt is not None:
        u = U[:, k0 * r : k1 * r].to(dev, non_blocking=True)
        vt = Vt[k0 * r : k1 * r].to(dev, non_blocking=True)
        # Scale the thinner side of the product by d, then one GEMM into the weight.
        if u.shape[0] <= vt.shape[1]:
            buf.addmm_(u * coef, vt)
        else:
            buf.addmm_(u, coef[:, None] * vt)
        return
    # Full rank keeps one side only (see Factors): U_k^T tau_k = S_k V_k^T, so
    # U_k diag(d_k) V_k^T = U_k diag(d_k / S_k) (U_k^T tau_k), and likewise for V.
    S = factors.S[name].to(device=dev, dtype=coef.dtype)
    for k in range(k0, k1):
        c = coef[(k - k0) * r : (k - k0 + 1) * r]
        c = torch.where(S[k] > 0, c / S[k].clamp_min(torch.finfo(c.dtype).tiny), torch.zeros_like(c))
        tau_k = factors.tau[name][k].to(dev, non_blocking=True)
        if U is not None:
            u = U[:, k * r : (k + 1) * r].to(dev, non_blocking=True)
            buf.addmm_(u, c[:, None] * (u.t() @ tau_k))
        else:
            vt = Vt[k * r : (k + 1) * r].to(dev, non_blocking=True)
            buf.addmm_((tau_k @ vt.t()) * c, vt)


@torch.no_grad()
def iter_weights(
    genome: Genome,
    factors: "Factors",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    reuse: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, weight)`` of ``genome`` one tensor at a time, built on ``device``.

    Per tensor: one ``addmv`` (base + task vectors times ``a``) and, for an SVD
    weight, one ``addmm`` over the factors of the experts whose ``d`` is nonzero;
    then any stored terms. Factors held elsewhere (host memory, pinned where CUDA
    exists) are moved to ``device`` one tensor at a time, so a full model is never
    copied at once.

    Args:
        device: where to build (default: the factors' device).
        dtype: of the yielded tensors (default: the factors' dtype, in which they are built).
        reuse: yield views of one scratch buffer that the next tensor overwrites
            (the consumer must copy each before drawing the next, as
            ``Engine.load_weights`` does); False yields fresh tensors.

    Raises:
        ValueError: genome made for other factors.
    """
    genome.check(factors)
    dev = torch.device(device) if device is not None else factors.device
    fdt = factors.dtype
    K = factors.num_experts
    a = genome.a.to(device=dev, dtype=fdt)
    d_cpu = genome.d.float()
    d = d_cpu.to(device=dev, dtype=fdt)
    scratch: torch.Tensor | None = None
    for t, name in enumerate(factors.names):
        base = factors.base[name]
        if reuse:
            if scratch is None or scratch.numel() < base.numel():
                scratch = torch.empty(base.numel(), device=dev, dtype=fdt)
            buf = scratch[: base.numel()].view(base.shape)
        else:
            buf = torch.empty(base.shape, device=dev, dtype=fdt)
        tau = factors.tau[name].to(dev, non_blocking=True)
        # base + sum_k a_k tau_k as one matrix-vector product over the stacked task vectors.
        torch.addmv(base.to(dev, non_blocking=True).reshape(-1), tau.view(K, -1).t(), a[t], out=buf.view(-1))
        if name in factors.d_slices:
            _svd_update(buf, factors, name, d, d_cpu, dev)
        for term in genome.terms:
            term.apply(buf, t, name)
        yield name, buf if dtype is None or dtype == fdt else buf.to(dtype)


@torch.no_grad()
def materialize(
    genome: Genome,
    factors: "Factors",
    *,
    into: "dict[str, torch.Tensor] | None" = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Build the model weights of ``genome`` from the resident factors, in one pass.

    Args:
        into: tensors to overwrite in place (must hold every tensor of the factors;
            extra keys such as a tied ``lm_head`` are left alone). Returned as given.
            An engine takes a genome with :meth:`~cycleqd.engine.protocol.Engine.load_genome`.
        device, dtype: of new tensors when ``into`` is None (default: the factors').

    Raises:
        ValueError: genome made for other factors, or a shape mismatch.
        KeyError: ``into`` lacks a tensor.
    """
    if into is not None and not isinstance(into, Mapping):
        raise TypeError(f"materialize: into must be a mapping of tensors, not {type(into).__name__} "
                        "(an engine takes a genome with engine.load_genome(genome, factors))")
    if into is None:
        dev = torch.device(device) if device is not None else factors.device
        return {n: w for n, w in iter_weights(genome, factors, device=dev, dtype=dtype, reuse=False)}
    for name in factors.names:
        if name not in into:
            raise KeyError(f"materialize: the target model has no tensor {name!r}")
        if tuple(into[name].shape) != factors.shape(name):
            raise ValueError(f"materialize: {name!r} has shape {list(into[name].shape)}, "
                             f"factors have {list(factors.shape(name))}")
    first = into[factors.names[0]] if factors.names else None
    dev = first.device if first is not None else factors.device
    for name, w in iter_weights(genome, factors, device=dev):
        into[name].copy_(w)
    return into
