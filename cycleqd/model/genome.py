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
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence, Union

import torch

from cycleqd.atomic import write_atomic
from cycleqd.bounded import loads_bounded

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
        """Inverse of :meth:`to_bytes`.

        Raises:
            ValueError: a blob that is not a whole genome (see :func:`header_problem`), before
                any tensor is parsed.
        """
        from safetensors.torch import load

        header, problem = parse_header(blob[:8], blob[8:8 + MAX_HEADER_BYTES], len(blob))
        if problem is not None:
            raise ValueError(problem if problem.startswith("not a genome") else f"not a genome: {problem}")
        return cls._from_parts(load(blob), header.get("__metadata__") or {})

    @classmethod
    def _from_parts(cls, tensors: dict[str, torch.Tensor], meta: Mapping[str, str]) -> "Genome":
        if meta.get("format") != _FORMAT:
            raise ValueError(f"not a genome (format {meta.get('format')!r})")
        terms: list[Term] = []
        for i, m in enumerate(_term_metas(meta)):
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
    def load(cls, path: str | os.PathLike, expect: "GenomeShape | None" = None) -> "Genome":
        """Read a genome written by :meth:`save`.

        The header is checked first (bounded size and nesting, the file exactly as long as
        its tensors, and, with ``expect``, the shapes of the run's layout), so an oversized
        or malformed file is refused before it is read.

        Raises:
            ValueError: not a whole genome (the message says what is wrong).
        """
        problem = genome_problem(path, expect, values=False)
        if problem is not None:
            raise ValueError(problem)
        return cls.from_bytes(Path(path).read_bytes())


# ------------------------------------------------------------------ bounded reading and validation

MAX_HEADER_BYTES = 16 << 20  # a genome's header: a few entries, plus one per delta tensor
MAX_COEFFICIENT = 1e6  # |a|, |d|, term coefficients: merges and mutations stay many orders below
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class GenomeShape:
    """What every genome of a run looks like, known from its layout without loading a model.

    Attributes:
        experts: K, the run's number of tasks (experts).
        tensors: T, the base's tensor count (``a`` is ``[T, K]``, a term's ``coef`` ``[T]``).
        d_size: D, ``K * sum(r_w)`` over the SVD weights (``d`` is ``[D]``).
        layout: ``Factors.layout`` of the run's factors.
        model: the base's tensor shapes (a delta term holds tensors of these names and shapes).
    """

    experts: int
    tensors: int | None = None
    d_size: int | None = None
    layout: str | None = None
    model: Mapping[str, tuple[int, ...]] | None = None

    @classmethod
    def from_models(cls, task_names: Sequence[str], shapes: Mapping[str, Sequence[int]],
                    rank: int | None) -> "GenomeShape":
        """The shape of the genomes over a base of tensor ``shapes`` (headers only) and these tasks.

        Follows :class:`~cycleqd.model.factors.Factors`: tensors in name order, an SVD block of
        ``K x min(rank, m, n)`` per 2-D weight that is not a norm, and the same layout hash.
        """
        from cycleqd.model.factors import is_svd_weight

        names = sorted(shapes)
        ranks = {n: (min(shapes[n]) if rank is None else min(rank, *shapes[n]))
                 for n in names if is_svd_weight(n, shapes[n])}
        K = len(task_names)
        spec = {"tasks": list(task_names), "tensors": [[n, list(shapes[n])] for n in names],
                "ranks": [[n, ranks[n]] for n in sorted(ranks)]}
        layout = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]
        return cls(experts=K, tensors=len(names), d_size=K * sum(ranks.values()), layout=layout,
                   model={n: tuple(int(x) for x in shapes[n]) for n in names})


def _term_metas(meta: Mapping[str, str]) -> list[dict]:
    terms = loads_bounded(meta.get("terms", "[]"), max_bytes=MAX_HEADER_BYTES)
    if not isinstance(terms, list) or not all(isinstance(m, dict) for m in terms):
        raise ValueError("not a genome (terms is not a list of objects)")
    return terms


def parse_header(head: bytes, rest: bytes, size: int) -> tuple[dict, str | None]:
    """The safetensors header of a ``size``-byte file from its first 8 bytes and what follows.

    Returns ``(header, None)`` or ``({}, problem)``. The header must be at most
    :data:`MAX_HEADER_BYTES`, nested at most a few levels, a JSON object of tensors with
    known dtypes and contiguous offsets that end exactly at the end of the file (a
    truncated or an oversized file is caught here, without reading its tensors).
    """
    if len(head) < 8:
        return {}, "truncated (no safetensors header)"
    n = int.from_bytes(head, "little")
    if n <= 0 or n > MAX_HEADER_BYTES:
        return {}, f"not a genome (a safetensors header of {n} bytes; at most {MAX_HEADER_BYTES})"
    if 8 + n > size or len(rest) < n:
        return {}, f"truncated or not safetensors (header of {n} bytes in a {size}-byte file)"
    try:
        header = loads_bounded(rest[:n], max_bytes=MAX_HEADER_BYTES, max_depth=4)
    except (ValueError, UnicodeDecodeError) as e:
        return {}, f"unreadable safetensors header ({e})"
    if not isinstance(header, dict):
        return {}, "unreadable safetensors header (not a JSON object)"
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        return {}, "unreadable safetensors header (__metadata__ is not a map of strings)"
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            return {}, f"unreadable safetensors header (tensor {name!r} is not an object)"
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int and x >= 0 for x in offsets)):
            return {}, f"unreadable safetensors header (tensor {name!r} has no data_offsets)"
        if dtype not in _ITEMSIZE or not (isinstance(shape, list) and len(shape) <= 8
                                          and all(type(x) is int and x >= 0 for x in shape)):
            return {}, f"unreadable safetensors header (tensor {name!r}: dtype {dtype!r}, shape {shape!r})"
        if offsets[1] - offsets[0] != math.prod(shape) * _ITEMSIZE[dtype]:
            return {}, f"unreadable safetensors header (tensor {name!r}: offsets do not match its shape)"
        spans.append(offsets)
    end = 0
    for b, e in sorted(spans):
        if b != end:
            return {}, "unreadable safetensors header (tensor data overlap or leave gaps)"
        end = e
    if 8 + n + end > size:
        return {}, f"truncated ({size} bytes, the header needs {8 + n + end})"
    if 8 + n + end < size:
        return {}, f"oversized ({size} bytes, the header describes {8 + n + end})"
    return header, None


def header_problem(header: dict, expect: GenomeShape | None = None) -> str | None:
    """What in a parsed safetensors ``header`` is not a genome (of ``expect``'s shape), or None."""
    meta = header.get("__metadata__", {})
    if meta.get("format") != _FORMAT:
        return f"not a genome (format {meta.get('format')!r})"
    try:
        terms = _term_metas(meta)
    except (ValueError, UnicodeDecodeError) as e:
        return f"not a genome (unreadable terms: {e})"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    a, d = tensors.get("a"), tensors.get("d")
    if a is None or d is None or len(a["shape"]) != 2 or len(d["shape"]) != 1:
        return "not a genome (no [T, K] tensor a or [D] tensor d)"
    T, K = a["shape"]
    want = {"a": [T, K], "d": list(d["shape"])}
    for i, m in enumerate(terms):
        kind = m.get("kind")
        if kind == "noise":
            std, seed = m.get("std"), m.get("seed")
            if not (isinstance(std, (int, float)) and math.isfinite(std) and 0 <= std <= MAX_COEFFICIENT
                    and type(seed) is int):
                return f"term {i}: noise with seed {seed!r} and std {std!r}"
        elif kind != "delta" or not isinstance(m.get("id"), str):
            return f"term {i}: unknown kind {kind!r}"
        want[f"term{i}.coef"] = [T]
    for name, info in tensors.items():
        if name in want:
            if info["dtype"] != "F32" or info["shape"] != want[name]:
                return f"tensor {name} is {info['dtype']} {info['shape']}, expected F32 {want[name]}"
            continue
        prefix, _, tensor = name.partition(".delta.")
        if not (prefix.startswith("term") and prefix[4:].isdigit() and int(prefix[4:]) < len(terms)
                and terms[int(prefix[4:])].get("kind") == "delta"):
            return f"tensor {name!r} is not part of a genome"
        if expect is not None and expect.model is not None:
            shape = expect.model.get(tensor)
            if shape is None or tuple(info["shape"]) != shape:
                return f"delta tensor {tensor!r} of shape {info['shape']} is not a tensor of the run's base"
    if any(f"term{i}.coef" not in tensors for i in range(len(terms))):
        return "not a genome (a term without its coefficients)"
    if expect is not None:
        checks = [("experts", K, expect.experts), ("tensors", T, expect.tensors),
                  ("SVD coefficients", d["shape"][0], expect.d_size), ("layout", meta.get("layout"), expect.layout)]
        for what, got, exp in checks:
            if exp is not None and got != exp:
                return f"{what}: {got}, the run's layout has {exp}"
    return None


def genome_problem(path: str | os.PathLike, expect: GenomeShape | None = None, *, values: bool = True,
                   deltas: bool = True) -> str | None:
    """What is wrong with a genome file (None if it is a whole genome of ``expect``'s shape).

    Reads the header only (bounded, see :func:`parse_header` and :func:`header_problem`);
    with ``values`` it then reads the tensors one at a time and checks that every
    coefficient is finite and within :data:`MAX_COEFFICIENT` (and, with ``deltas``, that
    delta tensors are finite).
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            rest = f.read(n) if 0 < n <= MAX_HEADER_BYTES else b""
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    header, problem = parse_header(head, rest, size)
    if problem is None:
        problem = header_problem(header, expect)
    if problem is not None or not values:
        return problem
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            for name in f.keys():
                delta = ".delta." in name
                if delta and not deltas:
                    continue
                x = f.get_tensor(name)
                if not bool(torch.isfinite(x).all()):
                    bad = int((~torch.isfinite(x)).sum())
                    return f"{bad} non-finite value(s) (NaN or inf) in tensor {name}"
                if not delta and x.numel() and float(x.abs().max()) > MAX_COEFFICIENT:
                    return (f"coefficient {float(x.abs().max()):.3g} in tensor {name} is out of range "
                            f"(|x| <= {MAX_COEFFICIENT:g})")
    except Exception as e:  # noqa: BLE001 - the format's own errors, named with the file by the caller
        return f"unreadable tensors ({e})"
    return None


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


def _low_rank_update(buf: torch.Tensor, factors: "Factors", name: str, a_row: torch.Tensor, d_cpu: torch.Tensor,
                     dev: torch.device) -> None:
    """``buf += sum_k U_k diag(a_k S_k + d_k) V_k^T``: the whole delta of factors that are the task vectors."""
    K, r = factors.num_experts, factors.ranks[name]
    coef = (a_row[:, None] * factors.S[name] + d_cpu[factors.d_slices[name]].view(K, r)).flatten()
    keep = coef.ne(0).nonzero().flatten()
    if keep.numel() == 0:
        return
    c = coef[keep].to(device=dev, dtype=buf.dtype)
    buf.addmm_(factors.U[name][:, keep].to(dev, non_blocking=True) * c, factors.Vt[name][keep].to(dev, non_blocking=True))


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
    low_rank = factors.low_rank
    for t, name in enumerate(factors.names):
        base = factors.base[name]
        if reuse:
            if scratch is None or scratch.numel() < base.numel():
                scratch = torch.empty(base.numel(), device=dev, dtype=fdt)
            buf = scratch[: base.numel()].view(base.shape)
        else:
            buf = torch.empty(base.shape, device=dev, dtype=fdt)
        if low_rank:
            # LoRA experts: no dense task vector; a_k enters as a_k S_k next to d_k (cycleqd.model.lora).
            buf.copy_(base.to(dev, non_blocking=True))
            if name in factors.d_slices:
                _low_rank_update(buf, factors, name, genome.a[t].float(), d_cpu, dev)
        else:
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
