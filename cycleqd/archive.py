"""K MAP-Elites archives with a rotating quality task, on pyribs grids.

Archive q is a grid over the bins of the other K-1 tasks; its cell holds the
model with the best score on task q among the models that land there. Every
model is offered to all K archives. Bins are (lo, hi] and scores outside the
range are clamped into the first / last bin, as in the official CycleQD code.

The archive holds genome ids and scores, never tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from cycleqd.config import Bins


@dataclass(frozen=True)
class Elite:
    """One occupied cell. ``cell`` indexes the other tasks' bins, in task order."""

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


class Archive:
    """The K archives of a CycleQD run.

    Args:
        tasks: task names, in config order.
        bins: each task's bin range and count.

    Insertion is pyribs' rule (a cell takes a model whose quality beats the
    incumbent's); measures are passed as bin centres so pyribs' half-open cells
    reproduce the (lo, hi] rule exactly.
    """

    def __init__(self, tasks: Sequence[str], bins: Mapping[str, Bins]):
        from ribs.archives import GridArchive

        if len(tasks) < 2:
            raise ValueError("an archive needs at least 2 tasks")
        self.tasks = list(tasks)
        self.bins = {t: bins[t] for t in self.tasks}
        self._grids = {}
        for q in self.tasks:
            others = self.others(q)
            dims = [self.bins[t].count for t in others]
            self._grids[q] = GridArchive(
                solution_dim=(),
                dims=dims,
                ranges=[(0.0, float(d)) for d in dims],
                solution_dtype=object,
                extra_fields={
                    "scores": ((len(self.tasks),), np.float64),
                    "generation": ((), np.int64),
                },
            )

    def others(self, task: str) -> list[str]:
        """The tasks whose bins span ``task``'s archive, in task order."""
        return [t for t in self.tasks if t != task]

    def cell(self, task: str, scores: Mapping[str, float]) -> tuple[int, ...]:
        """Cell of archive ``task`` that a model with ``scores`` lands in."""
        return tuple(bin_index(scores[t], self.bins[t]) for t in self.others(task))

    def offer(self, genome: str, scores: Mapping[str, float], generation: int) -> list[str]:
        """Offer a model to all K archives; return the tasks whose archive took it."""
        missing = [t for t in self.tasks if t not in scores]
        if missing:
            raise ValueError(f"scores lack task(s) {missing}")
        vec = np.array([scores[t] for t in self.tasks], dtype=np.float64)
        taken = []
        for q, grid in self._grids.items():
            measures = np.array(self.cell(q, scores), dtype=np.float64) + 0.5
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
        for sol, obj, meas, sc, gen in zip(
            data["solution"], data["objective"], data["measures"], data["scores"], data["generation"]
        ):
            cell = tuple(int(m) for m in np.floor(meas))
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
            "qd_score": float(sum(e.quality for e in self.elites(task))),
            "best": float(s.obj_max) if s.num_elites else 0.0,
        }

    def to_json(self, generation: int) -> dict:
        """The ``cycleqd show --json`` object."""
        return {
            "generation": generation,
            "tasks": list(self.tasks),
            "bins": {t: b.model_dump() for t, b in self.bins.items()},
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
    ) -> "Archive":
        """Rebuild archives by offering ``(genome, scores, generation)`` in order (resume, history)."""
        arch = cls(tasks, bins)
        for genome, scores, generation in models:
            arch.offer(genome, scores, generation)
        return arch
