"""K MAP-Elites archives with a rotating quality task, on pyribs grids or CVTs.

Archive q is a grid over the bins of the other K-1 tasks; its cell holds the
model with the best score on task q among the models that land there. Every
model is offered to all K archives. Bins are (lo, hi] and scores outside the
range are clamped into the first / last bin, as in the official CycleQD code.

With ``archive: {kind: cvt}`` each archive is instead a pyribs CVTArchive: a
model's measures are the other tasks' scores normalised by their bin ranges,
(s - lo) / (hi - lo) clamped to [0, 1], and its cell is the nearest of a fixed
set of centroids (seeded k-means, or given), so the cell count does not grow
as bins**(K-1). A CVT elite's ``cell`` is the 1-tuple (centroid index,).

The archive holds genome ids and scores, never tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping, Sequence

import numpy as np

from cycleqd.config import ArchiveConfig, Bins


@dataclass(frozen=True)
class Elite:
    """One occupied cell.

    ``cell`` indexes the other tasks' bins, in task order (grid archives), or is
    ``(centroid index,)`` (CVT archives; ``Archive.centroids`` gives the points).
    """

    task: str
    cell: tuple[int, ...]
    quality: float
    scores: Mapping[str, float]
    genome: str
    generation: int

    def to_json(self) -> dict:
        return {
            "cell": list(self.cell),
            "quality": self.quality,
            "scores": dict(self.scores),
            "genome": self.genome,
            "generation": self.generation,
        }


def bin_index(score: float, bins: Bins) -> int:
    """Index of the (lo, hi] bin holding ``score``, clamped to [0, count - 1]."""
    width = (bins.hi - bins.lo) / bins.count
    i = math.ceil((score - bins.lo) / width - 1e-9) - 1
    return min(max(i, 0), bins.count - 1)


@lru_cache(maxsize=16)
def _kmeans_centroids(cells: int, dim: int, seed: int) -> tuple[tuple[float, ...], ...]:
    # k-means is seconds of work; every archive of a run (and every rebuild) shares one result.
    from ribs.archives import k_means_centroids

    points, _ = k_means_centroids(centroids=cells, ranges=[(0.0, 1.0)] * dim, samples=max(20 * cells, 10_000),
                                  seed=seed)
    return tuple(tuple(float(x) for x in p) for p in points)


def cvt_centroids(spec: ArchiveConfig, dim: int) -> np.ndarray:
    """``[cells, dim]`` centroids of a CVT archive over ``dim`` normalised axes (seeded or given)."""
    if spec.centroids is not None:
        c = np.asarray(spec.centroids, dtype=np.float64)
        if c.ndim != 2 or c.shape[1] != dim:
            raise ValueError(f"archive.centroids have dimension {c.shape[-1]}, the archives need {dim}")
        return c
    return np.asarray(_kmeans_centroids(int(spec.cells), dim, int(spec.seed)), dtype=np.float64)


class Archive:
    """The K archives of a CycleQD run.

    Args:
        tasks: task names, in config order.
        bins: each task's bin range and count.
        spec: grid (default) or CVT, see :class:`cycleqd.config.ArchiveConfig`.

    Insertion is pyribs' rule (a cell takes a model whose quality beats the
    incumbent's). On grids, measures are passed as bin centres so pyribs'
    half-open cells reproduce the (lo, hi] rule exactly.
    """

    def __init__(self, tasks: Sequence[str], bins: Mapping[str, Bins], spec: ArchiveConfig | None = None):
        from ribs.archives import CVTArchive, GridArchive

        if len(tasks) < 2:
            raise ValueError("an archive needs at least 2 tasks")
        self.tasks = list(tasks)
        self.bins = {t: bins[t] for t in self.tasks}
        self.spec = spec or ArchiveConfig()
        self.kind = self.spec.kind
        fields = {"scores": ((len(self.tasks),), np.float64), "generation": ((), np.int64)}
        self.centroids = cvt_centroids(self.spec, len(self.tasks) - 1) if self.kind == "cvt" else None
        self._grids = {}
        for q in self.tasks:
            dims = [self.bins[t].count for t in self.others(q)]
            if self.kind == "cvt":
                self._grids[q] = CVTArchive(
                    solution_dim=(), centroids=self.centroids, ranges=[(0.0, 1.0)] * len(dims),
                    solution_dtype=object, extra_fields=fields, nearest_neighbors="brute_force",
                )
            else:
                self._grids[q] = GridArchive(
                    solution_dim=(), dims=dims, ranges=[(0.0, float(d)) for d in dims],
                    solution_dtype=object, extra_fields=fields,
                )

    def others(self, task: str) -> list[str]:
        """The tasks whose bins span ``task``'s archive, in task order."""
        return [t for t in self.tasks if t != task]

    def measures(self, task: str, scores: Mapping[str, float]) -> np.ndarray:
        """Where a model with ``scores`` sits in archive ``task``'s measure space.

        Grid: the centre of its cell in bin units. CVT: the other tasks' normalised scores.
        """
        if self.kind == "cvt":
            return np.array([min(max((scores[t] - self.bins[t].lo) / (self.bins[t].hi - self.bins[t].lo), 0.0), 1.0)
                             for t in self.others(task)], dtype=np.float64)
        return np.array([bin_index(scores[t], self.bins[t]) for t in self.others(task)], dtype=np.float64) + 0.5

    def cell(self, task: str, scores: Mapping[str, float]) -> tuple[int, ...]:
        """Cell of archive ``task`` that a model with ``scores`` lands in (CVT: ``(centroid index,)``)."""
        if self.kind == "cvt":
            return (int(self._grids[task].index_of_single(self.measures(task, scores))),)
        return tuple(bin_index(scores[t], self.bins[t]) for t in self.others(task))

    def offer(self, genome: str, scores: Mapping[str, float], generation: int) -> list[str]:
        """Offer a model to all K archives; return the tasks whose archive took it."""
        missing = [t for t in self.tasks if t not in scores]
        if missing:
            raise ValueError(f"scores lack task(s) {missing}")
        vec = np.array([scores[t] for t in self.tasks], dtype=np.float64)
        taken = []
        for q, grid in self._grids.items():
            measures = self.measures(q, scores)
            solution = np.empty(1, dtype=object)
            solution[0] = genome
            status = grid.add(
                solution,
                np.array([scores[q]]),
                measures[None, :],
                scores=vec[None, :],
                generation=np.array([generation]),
            )["status"]
            if int(status[0]) > 0:
                taken.append(q)
        return taken

    def elites(self, task: str) -> list[Elite]:
        """Elites of archive ``task``, sorted by cell."""
        data = self._grids[task].data()
        out = []
        for sol, obj, meas, idx, sc, gen in zip(
            data["solution"], data["objective"], data["measures"], data["index"], data["scores"], data["generation"]
        ):
            cell = (int(idx),) if self.kind == "cvt" else tuple(int(m) for m in np.floor(meas))
            out.append(
                Elite(
                    task=task,
                    cell=cell,
                    quality=float(obj),
                    scores={t: float(s) for t, s in zip(self.tasks, sc)},
                    genome=str(sol),
                    generation=int(gen),
                )
            )
        return sorted(out, key=lambda e: e.cell)

    def all_elites(self) -> list[Elite]:
        return [e for t in self.tasks for e in self.elites(t)]

    def stats(self, task: str) -> dict[str, float]:
        """coverage (filled cells / all cells), qd_score (sum of qualities), best quality."""
        s = self._grids[task].stats
        n = self._grids[task].cells
        return {
            "coverage": float(s.num_elites) / n,
            "qd_score": self._qd_score(task),
            "best": float(s.obj_max) if s.num_elites else 0.0,
        }

    def _qd_score(self, task: str) -> float:
        """Sum of the elites' qualities in cell order (the same float as over :meth:`elites`, without building them)."""
        data = self._grids[task].data(["objective", "index"])
        order = np.argsort(data["index"], kind="stable")
        return float(sum(float(x) for x in data["objective"][order]))

    def to_json(self, generation: int) -> dict:
        """The ``cycleqd show --json`` object (plus ``archive``: the kind, and a CVT's centroids)."""
        kind: dict = {"kind": self.kind}
        if self.kind == "cvt":
            kind["centroids"] = [[round(float(x), 6) for x in c] for c in self.centroids]
        return {
            "generation": generation,
            "tasks": list(self.tasks),
            "bins": {t: b.model_dump() for t, b in self.bins.items()},
            "archive": kind,
            "archives": {
                t: {**self.stats(t), "elites": [e.to_json() for e in self.elites(t)]} for t in self.tasks
            },
        }

    @classmethod
    def replay(
        cls,
        tasks: Sequence[str],
        bins: Mapping[str, Bins],
        models: Iterable[tuple[str, Mapping[str, float], int]],
        spec: ArchiveConfig | None = None,
    ) -> "Archive":
        """Rebuild archives by offering ``(genome, scores, generation)`` in order (resume, history)."""
        arch = cls(tasks, bins, spec)
        for genome, scores, generation in models:
            arch.offer(genome, scores, generation)
        return arch
