"""A child's three records: the spec ``ask()`` gives, the result a worker returns, and the
:class:`ChildRecord` that ``tell()`` makes: one line of children.jsonl, the typed record of
one finished child.

The scheduler's ``tell`` makes it, the store appends it, and every reader of a
run folder (resume, show, plots, report, export, check) loads it back; nothing
else reads the log.

"generation" means one thing everywhere: one generation is one finished child.
A record's ``generation`` is the number of children finished when it was told,
i.e. its 1-based line in children.jsonl; "the archives at generation N" are the
seed experts (generation 0) plus the first N lines offered in order. ``index``
is the order in which the child was asked (it fixes its id, quality task and
seed); with several workers children finish out of order, so ``index + 1``
need not equal ``generation``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from pydantic import BaseModel, ConfigDict, Field

_ID = re.compile(r"g(\d+)")


@dataclass(frozen=True)
class ChildSpec:
    """Everything a worker needs to rebuild one child exactly (the seed travels with it)."""

    index: int
    id: str
    quality_task: str
    parents: tuple[str, ...]
    seed: int
    # a search over merge coefficients (cma_es, nsga2, random) asks for this point of its box instead
    # of a crossover of parents (see cycleqd.search.space.CoefficientSpace)
    coefficients: tuple[float, ...] | None = None
    operators: tuple[float, float, float] | None = None  # crossover mu, sigma, mutation rate (operator control)


@dataclass(frozen=True)
class ChildResult:
    """A worker's answer: the child's genome bytes and scores, or the error that stopped it."""

    id: str
    genome: bytes | None
    scores: Mapping[str, float]
    seconds: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None
    worker: int = 0
    episodes: tuple[dict, ...] | None = None  # passing conversations, when evolution.record_episodes is on
    truncated: Mapping[str, float] = field(default_factory=dict)  # task -> share of answers at max_new_tokens
    node: str | None = None  # the Ray node id the worker ran on (None in process)


class SeedRecord(BaseModel):
    """A seed expert of generation 0: its task, genome id and scores (an entry of seeds.json)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: str
    genome: str
    scores: dict[str, float]
    truncated: dict[str, float] = Field(default_factory=dict)


class ChildRecord(BaseModel):
    """A finished child: who asked for it, what came back, where it went.

    Attributes:
        generation: its line number in children.jsonl (children finished so far, itself included).
        index: 0-based ask order; ``id`` is ``g{index + 1:06d}``.
        id: genome id (``genomes/<id>.safetensors``, written before the line when ``error`` is None).
        quality_task: the archive its parents were drawn from.
        parents: parent genome ids.
        scores: task -> quality (empty for a failed child).
        inserted: the archives that took it.
        seconds: time per stage.
        seed: the seed all its randomness came from.
        worker: the worker that built it.
        node: the Ray node its worker ran on (None in process, and in logs written before it was recorded).
        error: why it failed, or None.
        truncated: task -> share of its answers that stopped at ``max_new_tokens`` (tasks whose
            engine cannot tell are left out).
        operators: crossover mu, sigma and mutation rate an operator control chose (else None).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    generation: int = Field(ge=1)
    index: int = Field(-1, ge=-1)
    id: str
    quality_task: str
    parents: tuple[str, ...]
    scores: dict[str, float] = Field(default_factory=dict)
    inserted: tuple[str, ...] = ()
    seconds: dict[str, float] = Field(default_factory=dict)
    seed: int = Field(ge=0)
    worker: int = 0
    node: str | None = None
    error: str | None = None
    truncated: dict[str, float] = Field(default_factory=dict)
    operators: tuple[float, float, float] | None = None

    def model_post_init(self, _context: object) -> None:
        if self.index < 0:  # logs written before ``index`` was recorded: the id carries it
            m = _ID.fullmatch(self.id)
            object.__setattr__(self, "index", int(m.group(1)) - 1 if m else self.generation - 1)

    @property
    def ok(self) -> bool:
        """True if the child was built and scored (its genome exists and it was offered)."""
        return self.error is None

    def mean(self, tasks: list[str]) -> float | None:
        """Mean score over ``tasks`` (None for a failed child)."""
        if not self.ok or any(t not in self.scores for t in tasks):
            return None
        return sum(self.scores[t] for t in tasks) / len(tasks)

    def to_line(self) -> str:
        """The JSON line the store appends."""
        return self.model_dump_json()
