"""CoefficientSearch: the ask/tell protocol of :class:`~cycleqd.search.scheduler.Scheduler` for
searches over merge coefficients (CMA-ES, NSGA-II, random; see :mod:`cycleqd.search.space`).

A search draws points in *batches* (a CMA-ES generation, an NSGA-II offspring population, one
random point); child ``index`` is the ``index``-th point drawn, so its id and seed follow
as for a CycleQD child, and its spec carries the point (``ChildSpec.coefficients``) instead of
parents. A *blocking* search learns from a batch only once every child of it is told (in
index order, whatever order they finished in) and draws the next batch only then, so while a
batch's last children are in flight ``wants_more()`` is False and idle workers wait.

State is a pure function of the run's seed and its log: a new search replays the log (draw a
batch, learn from its logged scores, ...) and so continues exactly where the run stopped. A
child that was in flight when the run was killed is asked again with the same index, id and
point, so a resumed run asks for the same children as one never stopped. Every finished child
is also offered to the K archives, so ``show``, heatmaps, export and the table read these
runs as they read CycleQD's. A failed child counts as scoring 0 on every task.
"""
from __future__ import annotations

import time
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from cycleqd.config import Config, ConfigError, one_line_error
from cycleqd.search.archive import Archive
from cycleqd.search.child import ChildRecord, ChildResult, ChildSpec
from cycleqd.search.scheduler import AskTell, OrderError, child_seed
from cycleqd.search.space import CoefficientSpace, SpaceOptions


class CoefficientSearch(AskTell):
    """ask/tell over a :class:`CoefficientSpace`; subclasses say how a batch is drawn and learnt.

    Args:
        cfg: the run's config (``evolution.search`` names the search and holds its options).
        archive: the K archives (children are offered to them as CycleQD's are).
        log: the children already told (children.jsonl), replayed to restore the search's state.
        space: the coefficient space (default: over ``cfg``'s base model, from its headers).

    Attributes:
        generation: children told so far.
        options: the validated ``evolution.search.options``.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[SpaceOptions]] = SpaceOptions
    blocking: ClassVar[bool] = True  # learn from whole batches (and wait for them)

    def __init__(self, cfg: Config, archive: Archive | None, log: Sequence[ChildRecord] = (), *,
                 space: CoefficientSpace | None = None):
        self.cfg, self.archive = cfg, archive
        self.tasks = cfg.task_names
        self.options = self.parse_options(cfg)
        self.space = space if space is not None else CoefficientSpace.of(cfg, self.options)
        self.generation = len(log)
        self.batches = 0  # batches learnt from
        self._points: dict[int, np.ndarray] = {}  # index -> point of the batch being asked or waited for
        self._batch: list[int] = []  # indices of the current batch
        self._values: dict[int, np.ndarray] = {}  # index -> its K qualities, once told
        self._queue: list[int] = []  # drawn, not asked
        self._asked: dict[int, ChildSpec] = {}
        self._told: set[int] = set()
        self._drawn = 0  # points drawn so far (= the next index)
        self._setup()
        self._replay(log)

    # -- what a search says ----------------------------------------------------------------
    def _setup(self) -> None:
        """Create the optimizer (all randomness from the run's seed)."""

    def _draw(self) -> list[np.ndarray]:
        """The next batch of points (raw, as the optimizer wants them told back)."""
        raise NotImplementedError

    def _learn(self, points: list[np.ndarray], values: list[np.ndarray]) -> None:
        """Tell the optimizer a whole batch: its points and their K qualities (task order)."""

    def _state(self) -> dict[str, Any]:
        """What the search's state file adds (JSON)."""
        return {}

    @classmethod
    def parse_options(cls, cfg: Config) -> SpaceOptions:
        """``evolution.search.options`` as this search's ``Options``.

        Raises:
            ConfigError: an unknown option or a bad value, in one line.
        """
        from pydantic import ValidationError

        from cycleqd.registry import did_you_mean

        options = cfg.evolution.search.options
        fields = list(cls.Options.model_fields)
        for key in options:
            if key not in fields:
                raise ConfigError(f"evolution.search ({cls.name}): unknown option {key!r}{did_you_mean(key, fields)} "
                                  f"(options: {', '.join(fields)})")
        try:
            parsed = cls.Options.model_validate(options)
        except ValidationError as e:
            raise ConfigError(f"evolution.search ({cls.name}): options.{one_line_error(e, cls.Options)}") from None
        cls._check_against(parsed, cfg)
        return parsed

    @classmethod
    def _check_against(cls, options: SpaceOptions, cfg: Config) -> None:
        """Checks of options that need the rest of the config (e.g. task names)."""

    @classmethod
    def check_options(cls, cfg: Config) -> None:
        """The config-time check (:func:`cycleqd.config.parse_config` calls it); raises ConfigError."""
        cls.parse_options(cfg)

    # -- the protocol of Scheduler -------------------------------------------------------
    @property
    def next_index(self) -> int:
        return self._queue[0] if self._queue else self._drawn

    def wants_more(self) -> bool:
        """True while finished plus in-flight children fall short of the target and a point can be asked
        (a blocking search waits for its batch's last children before it draws more)."""
        return self.generation + len(self._asked) < self.target and (bool(self._queue) or not self.blocking)

    def done(self) -> bool:
        return self.generation >= self.target

    def ask(self) -> ChildSpec:
        """The next child's spec: its point of the box, id and seed.

        Raises:
            OrderError: a blocking search's batch is all asked and not all told.
        """
        if not self._queue:
            if self.blocking:
                raise OrderError(f"{self.name}: the batch in flight must be told before more is asked")
            self._new_batch()
        index = self._queue.pop(0)
        x = self.space.clip(self._points[index])
        spec = ChildSpec(index=index, id=f"g{index + 1:06d}", quality_task=self.name, parents=(),
                         seed=child_seed(self.cfg, index), coefficients=tuple(float(v) for v in x))
        self._asked[index] = spec
        return spec

    def tell(self, spec: ChildSpec, result: ChildResult, seconds: Mapping[str, float] | None = None) -> ChildRecord:
        """Offer a finished child to the K archives (unless it failed), learn from its batch once the
        batch is whole, and return its log record.

        Raises:
            OrderError: ``spec`` was never asked, was told already, or ``result`` is another child's.
        """
        t0 = time.perf_counter()
        self._take(spec, result)
        self.generation += 1
        ok = result.error is None
        inserted = self.archive.offer(spec.id, result.scores, self.generation) if ok and self.archive else []
        self._record(spec.index, dict(result.scores) if ok else {})
        return ChildRecord(
            generation=self.generation, index=spec.index, id=spec.id, quality_task=spec.quality_task,
            parents=(), scores=dict(result.scores) if ok else {}, inserted=tuple(inserted),
            seconds={**result.seconds, **(seconds or {}), "tell": time.perf_counter() - t0},
            seed=spec.seed, worker=result.worker, error=result.error,
        )

    def forget_in_flight(self) -> list[ChildSpec]:
        """Drop the asked, untold specs (cancelled children): they go back to the front of the queue."""
        dropped = sorted(self._asked.values(), key=lambda s: s.index)
        self._asked.clear()
        self._queue = sorted({*self._queue, *(s.index for s in dropped)})
        return dropped

    def search_state(self) -> dict[str, Any]:
        """The search's state as JSON (RUN/search.json): a view; resume replays the log."""
        return {"search": self.name, "generation": self.generation, "drawn": self._drawn,
                "batches": self.batches, "in_batch": list(self._batch),
                "dim": self.space.dim, "bounds": [self.space.lo, self.space.hi], **self._state()}

    # -- batches ---------------------------------------------------------------------------
    def _values_of(self, scores: Mapping[str, float]) -> np.ndarray:
        return np.array([float(scores.get(t, 0.0)) for t in self.tasks], dtype=np.float64)

    def _new_batch(self) -> None:
        points = self._draw()
        if not points:
            raise RuntimeError(f"{self.name}: the optimizer drew an empty batch")
        batch = list(range(self._drawn, self._drawn + len(points)))
        self._drawn += len(points)
        for i, x in zip(batch, points):
            self._points[i] = np.asarray(x, dtype=np.float64)
        self._batch = batch
        self._queue.extend(batch)

    def _record(self, index: int, scores: Mapping[str, float]) -> None:
        """``index`` was told with ``scores`` (empty: failed): learn once its batch is whole."""
        self._told.add(index)
        self._values[index] = self._values_of(scores)
        self._on_told(index, scores)
        if self.blocking and all(i in self._values for i in self._batch):
            self._learn([self._points[i] for i in self._batch], [self._values[i] for i in self._batch])
            self.batches += 1
            for i in self._batch:
                del self._points[i], self._values[i]
            self._new_batch()
        elif not self.blocking:
            self._points.pop(index, None)
            self._values.pop(index, None)

    def _on_told(self, index: int, scores: Mapping[str, float]) -> None:
        """A child was told (live or replayed): for searches that keep a best or a front."""

    def _replay(self, log: Sequence[ChildRecord]) -> None:
        """Restore the state from the log: the batches drawn and learnt exactly as the run did."""
        told = {c.index: c for c in log}
        if len(told) != len(log):
            raise ValueError(f"{self.name}: the log holds a child index twice")
        self._new_batch()
        if self.blocking:
            while all(i in told for i in self._batch):
                for i in list(self._batch):
                    self._queue.remove(i)
                    self._record(i, told[i].scores if told[i].ok else {})
            for i in [i for i in self._batch if i in told]:
                self._queue.remove(i)
                self._record(i, told[i].scores if told[i].ok else {})
            stray = [i for i in told if i not in self._told]
        else:
            last = max(told, default=-1)
            while self._drawn <= last:
                self._new_batch()
            for i in sorted(told):
                self._queue.remove(i)
                self._record(i, told[i].scores if told[i].ok else {})
            stray = []
        if stray:
            raise ValueError(f"{self.name}: the log holds children {sorted(stray)[:5]} this search never asks "
                             "before the ones it holds are told (another search's log?)")
