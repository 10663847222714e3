"""Scheduler: CycleQD's ask/tell over the K archives.

``ask()`` gives the next child spec (quality task, parents drawn from its
archive, seed); a worker executes it; ``tell(spec, result)`` offers the result to
all K archives and returns the :class:`~cycleqd.search.child.ChildRecord` the store
appends. Specs are small and serialisable, and everything random about a child
comes from its index and the run's seed, so a run replays exactly. The order is
guarded: telling a spec that was never asked, or telling it twice, raises
:class:`OrderError`.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Mapping

import numpy as np

from cycleqd.config import Config
from cycleqd.registry import SAMPLERS
from cycleqd.search.archive import Archive
from cycleqd.search.child import ChildRecord, ChildResult, ChildSpec


class OrderError(RuntimeError):
    """tell() for a spec this scheduler never asked, or one already told."""


def quality_task(cfg: Config, index: int) -> str:
    """The task whose archive child ``index`` (0-based ask order) is drawn from: rotates every flip_interval."""
    if cfg.evolution.fixed_quality_task:
        return cfg.evolution.fixed_quality_task
    k = len(cfg.tasks)
    return cfg.task_names[(index // cfg.evolution.flip_interval) % k]


def child_seed(cfg: Config, index: int) -> int:
    """The seed of child ``index``: a function of the run's seed and the index only."""
    return int(np.random.SeedSequence([cfg.seed, index]).generate_state(1)[0])


class AskTell:
    """What every search's ask/tell shares: the run's target and the specs asked and not yet told."""

    cfg: Config
    _asked: dict[int, ChildSpec]
    _told: set[int]

    @property
    def target(self) -> int:
        """Children the run asks for (``evolution.generations``)."""
        return self.cfg.evolution.generations

    @property
    def in_flight(self) -> int:
        """Specs asked and not yet told."""
        return len(self._asked)

    def _take(self, spec: ChildSpec, result: ChildResult) -> None:
        """Guard the order of a tell and take ``spec`` off the in-flight specs.

        Raises:
            OrderError: ``spec`` was never asked here, was told already, or ``result`` is another child's.
        """
        if spec.index in self._told:
            raise OrderError(f"child {spec.id} (index {spec.index}) was told already")
        if self._asked.get(spec.index) != spec:
            raise OrderError(f"child {spec.id} (index {spec.index}) was never asked by this {type(self).__name__}")
        if result.id != spec.id:
            raise OrderError(f"result of {result.id} told for child {spec.id}")
        del self._asked[spec.index]


class Scheduler(AskTell):
    """ask/tell over ``archive`` for the run ``cfg``.

    Args:
        cfg: the run's config (seed, tasks, sampling, generations).
        archive: the K archives, already holding the seeds and every logged child.
        log: the children already told (from children.jsonl), so a resumed scheduler
            continues the ask order and the generation count where the run stopped.
        folder: the run folder, where ``evolution.operator_control`` keeps its state
            (:class:`~cycleqd.search.operator_control.OperatorControl`).

    Attributes:
        generation: children told so far (one generation = one finished child).
    """

    def __init__(self, cfg: Config, archive: Archive, log: list[ChildRecord] = (),
                 folder: str | os.PathLike | None = None):
        self.cfg, self.archive = cfg, archive
        self.control = None
        if cfg.evolution.operator_control is not None:
            from cycleqd.search.operator_control import OperatorControl

            self.control = OperatorControl(cfg.evolution.operator_control, archive, folder)
        self.generation = len(log)
        self.next_index = max((c.index for c in log), default=-1) + 1
        self._told = {c.index for c in log}
        self._asked: dict[int, ChildSpec] = {}

    def wants_more(self) -> bool:
        """True while finished plus in-flight children fall short of the target."""
        return self.generation + len(self._asked) < self.target

    def done(self) -> bool:
        return self.generation >= self.target

    def ask(self) -> ChildSpec:
        """The next child's spec: quality task, two parents drawn from its archive, seed."""
        index = self.next_index
        q_name = quality_task(self.cfg, index)
        rng = np.random.default_rng([self.cfg.seed, index, 1])
        sampler = SAMPLERS.get(self.cfg.evolution.sampling.name)
        parents = sampler(self.archive.elites(q_name), 2, self.cfg.evolution.sampling, rng)
        spec = ChildSpec(index=index, id=f"g{index + 1:06d}", quality_task=q_name,
                         parents=tuple(p.genome for p in parents),
                         seed=child_seed(self.cfg, index))
        if self.control is not None:
            spec = replace(spec, operators=self.control.ask(index, q_name, [p.cell for p in parents]))
        self.next_index += 1
        self._asked[index] = spec
        return spec

    def tell(self, spec: ChildSpec, result: ChildResult, seconds: Mapping[str, float] | None = None) -> ChildRecord:
        """Offer a finished child to all K archives (unless it failed) and return its log record.

        The caller saves the genome before telling and appends the record after.

        Raises:
            OrderError: ``spec`` was never asked by this scheduler, was told already, or
                ``result`` is another child's.
        """
        t0 = time.perf_counter()
        self._take(spec, result)
        self._told.add(spec.index)
        self.generation += 1
        inserted = self.archive.offer(spec.id, result.scores, self.generation) if result.error is None else []
        if self.control is not None:
            self.control.tell(spec.index, result.scores if result.error is None else None)
        return ChildRecord(
            generation=self.generation, index=spec.index, id=spec.id, quality_task=spec.quality_task,
            parents=spec.parents, scores=dict(result.scores) if result.error is None else {},
            inserted=tuple(inserted),
            seconds={**result.seconds, **(seconds or {}), "tell": time.perf_counter() - t0},
            seed=spec.seed, worker=result.worker, node=result.node, error=result.error, operators=spec.operators,
            truncated=dict(result.truncated) if result.error is None else {},
        )

    def forget_in_flight(self) -> list[ChildSpec]:
        """Drop the asked, untold specs (cancelled children); returns them."""
        dropped = list(self._asked.values())
        self._asked.clear()
        return dropped
