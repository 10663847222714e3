"""CMA-ES operator control: the official CycleQD code's ``qd.use_cma``.

One ``cma.CMAEvolutionStrategy`` per quality task q (``evolution.operator_control``:
popsize 8, sigma 0.01, seed 42 as officially), over ``2 (K-1) x 3`` weights starting at
zero. A child of q takes the next candidate ``x`` of q's current population; its
operator parameters are a linear function of its parents' normalised bins::

    inputs = (cell(parent1) + cell(parent2)) / (bin counts of the other tasks, twice)
    (mu, sigma, rate) = inputs @ x.reshape(len(inputs), 3)

and the crossover draws ``w ~ N(1 + mu, |sigma|)``, the SVD mutation ``r ~ U[0, rate)``.
When the child is told, its fitness is its quality on q plus its own normalised bins in
q's archive (a failed child: 0); CMA minimises, so ``-fitness`` is told, once the whole
population has come back (official main.py L65-91, L113-124, L176-193).

With several workers children come back out of order: a population is told when all its
candidates have come back, and a new population is asked when every candidate of the
asked ones is taken, so more workers than ``popsize`` are kept busy (officially every
worker process had solvers of its own; here one driver-side solver per task sees every
child). Each solver draws from its own ``RandomState(seed)``.

The state is an append-only event log in the run folder (``operator_control.jsonl``: each
population asked, each fitness, each population told). A resumed run replays it into fresh
solvers, checks that every replayed population equals the logged one, and hands the
candidates of children that never came back to new children.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cycleqd.config import OperatorControlConfig
from cycleqd.search.archive import Archive

#: Operator parameters per candidate: crossover mu, crossover sigma, mutation rate.
N_PARAMS = 3
FILE = "operator_control.jsonl"


class ControlStateError(RuntimeError):
    """The run folder's operator-control log does not replay (another seed, popsize or code)."""


def operator_params(x: np.ndarray, parent_cells: Sequence[Sequence[int]], counts: Sequence[int]) -> np.ndarray:
    """(mu, sigma, rate) of a child: its parents' cells over the bin counts, times ``x`` as a matrix.

    ``parent_cells`` are the two parents' cells in q's archive (bin indices of the other
    tasks) and ``counts`` those tasks' bin counts, as the official ``np.dot(input_data,
    params.reshape((input_data.size, -1)))``.
    """
    inputs = np.concatenate([np.asarray(c, dtype=np.float64) for c in parent_cells]) / np.tile(
        np.asarray(counts, dtype=np.float64), len(parent_cells))
    return inputs @ np.asarray(x, dtype=np.float64).reshape(inputs.size, -1)


def child_fitness(quality: float, cell: Sequence[int], counts: Sequence[int]) -> float:
    """The official fitness of a child for q's solver: quality on q + its normalised bins (maximised)."""
    return float(np.sum(np.asarray(cell, dtype=np.float64) / np.asarray(counts, dtype=np.float64)) + quality)


def make_solver(dim: int, cfg: OperatorControlConfig):
    """The official solver: ``x0 = 0``, ``sigma0``, ``popsize``, ``seed`` (0 means 42), its own normal draws."""
    import cma

    seed = cfg.seed if cfg.seed > 0 else 42
    rs = np.random.RandomState(seed)
    return cma.CMAEvolutionStrategy(np.zeros(dim), cfg.sigma,
                                    inopts={"popsize": cfg.popsize, "seed": seed, "randn": rs.randn,
                                            "verbose": -9})


@dataclass
class _Population:
    number: int
    candidates: list[np.ndarray]
    owner: dict[int, int] = field(default_factory=dict)  # slot -> child index in flight
    fitness: dict[int, float] = field(default_factory=dict)  # slot -> fitness (maximised)

    def free_slot(self) -> int | None:
        for slot in range(len(self.candidates)):
            if slot not in self.owner and slot not in self.fitness:
                return slot
        return None


class _TaskControl:
    """One quality task's solver and its populations in flight."""

    def __init__(self, dim: int, cfg: OperatorControlConfig):
        self.solver = make_solver(dim, cfg)
        self.populations: list[_Population] = []
        self.asked = 0

    def new_population(self) -> _Population:
        pop = _Population(self.asked, [np.asarray(x, dtype=np.float64) for x in self.solver.ask()])
        self.asked += 1
        self.populations.append(pop)
        return pop

    def tell_ready(self) -> list[int]:
        """Tell every complete population at the head of the queue (in ask order); their numbers."""
        told = []
        while self.populations and len(self.populations[0].fitness) == len(self.populations[0].candidates):
            pop = self.populations.pop(0)
            self.solver.tell(pop.candidates, [-pop.fitness[s] for s in range(len(pop.candidates))])
            told.append(pop.number)
        return told


class OperatorControl:
    """CMA-ES operator control over the K archives of a run (see the module docstring).

    Args:
        cfg: the ``evolution.operator_control`` settings.
        archive: the run's archives (tasks, bins and each archive's other tasks).
        folder: the run folder its event log lives in (None: kept in memory only).
    """

    def __init__(self, cfg: OperatorControlConfig, archive: Archive, folder: str | os.PathLike | None = None):
        self.cfg, self.archive = cfg, archive
        self.counts = {q: [archive.bins[t].count for t in archive.others(q)] for q in archive.tasks}
        self.tasks = {q: _TaskControl(2 * len(self.counts[q]) * N_PARAMS, cfg) for q in archive.tasks}
        self._slot: dict[int, tuple[str, int, int]] = {}  # child index -> (q, population, slot)
        self.path = Path(folder) / FILE if folder is not None else None
        if self.path is not None and self.path.exists():
            self._replay()

    # -- ask / tell --------------------------------------------------------------------------
    def ask(self, index: int, q: str, parent_cells: Sequence[Sequence[int]]) -> tuple[float, float, float]:
        """The operator parameters (mu, sigma, rate) of child ``index`` of q with these parents' cells."""
        ctl = self.tasks[q]
        pop, slot = next(((p, s) for p in ctl.populations if (s := p.free_slot()) is not None), (None, None))
        if pop is None:
            pop = ctl.new_population()
            self._log({"event": "ask", "task": q, "population": pop.number,
                       "candidates": [c.tolist() for c in pop.candidates]})
            slot = 0
        pop.owner[slot] = index
        self._slot[index] = (q, pop.number, slot)
        mu, sigma, rate = operator_params(pop.candidates[slot], parent_cells, self.counts[q])
        return float(mu), float(sigma), float(rate)

    def tell(self, index: int, scores: Mapping[str, float] | None) -> None:
        """Child ``index`` came back with ``scores`` (None or empty: it failed, fitness 0)."""
        if index not in self._slot:
            return  # asked before a restart: its candidate was handed on
        q, number, slot = self._slot.pop(index)
        fitness = 0.0
        if scores:
            fitness = child_fitness(scores[q], self.archive.cell(q, scores), self.counts[q])
        self._log({"event": "fitness", "task": q, "population": number, "slot": slot, "child": index,
                   "fitness": fitness})
        self._record(q, number, slot, fitness)

    def _record(self, q: str, number: int, slot: int, fitness: float) -> None:
        ctl = self.tasks[q]
        pop = next(p for p in ctl.populations if p.number == number)
        pop.owner.pop(slot, None)
        pop.fitness[slot] = fitness
        for told in ctl.tell_ready():
            self._log({"event": "tell", "task": q, "population": told})

    # -- the event log -----------------------------------------------------------------------
    def _log(self, event: dict) -> None:
        if self.path is None or getattr(self, "_replaying", False):
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _replay(self) -> None:
        """Rebuild every solver from the log; candidates taken by children that never came back are free."""
        lines = self.path.read_text(encoding="utf-8").split("\n")
        events = []
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                if n >= len(lines) - 2:  # a line cut by a kill
                    break
                raise ControlStateError(f"{self.path}:{n + 1}: not JSON") from None
        self._replaying = True
        try:
            for ev in events:
                ctl = self.tasks.get(ev.get("task"))
                if ctl is None:
                    raise ControlStateError(f"{self.path}: event for unknown task {ev.get('task')!r}")
                if ev["event"] == "ask":
                    pop = ctl.new_population()
                    logged = np.asarray(ev["candidates"], dtype=np.float64)
                    if pop.number != ev["population"] or logged.shape != np.shape(pop.candidates) or not np.array_equal(
                            logged, np.asarray(pop.candidates)):
                        raise ControlStateError(f"{self.path}: population {ev['population']} of {ev['task']} does "
                                                "not replay (another seed, popsize or cma version)")
                elif ev["event"] == "fitness":
                    self._record(ev["task"], ev["population"], ev["slot"], float(ev["fitness"]))
        finally:
            self._replaying = False
        # a torn last line is cut off so the next event starts on a line of its own
        text = "".join(json.dumps(ev) + "\n" for ev in events)
        if text != self.path.read_text(encoding="utf-8"):
            from cycleqd.atomic import write_atomic

            write_atomic(self.path, text)
