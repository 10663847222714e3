"""Typed results every task returns, and the Task protocol."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from cycleqd.engine.protocol import Engine, GenRequest


@dataclass(frozen=True)
class SampleResult:
    """One sample's outcome: score in [0, 1] (1 = solved), error text if it failed to run."""

    id: str
    score: float
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskResult:
    """A task's verdict on one model: quality = mean sample score."""

    task: str
    quality: float
    n: int
    samples: tuple[SampleResult, ...]
    seconds: float

    @property
    def failed_ids(self) -> list[str]:
        return [s.id for s in self.samples if s.score < 1.0]


class Task(Protocol):
    """A skill benchmark. ``evaluate`` never raises for a bad sample: it records a failed sample."""

    name: str

    def sample_ids(self) -> list[str]:
        ...

    def evaluate(self, engine: Engine, ids: Sequence[str] | None = None) -> TaskResult:
        ...


class Votable(Protocol):
    """A task that can say what an answer *does*, so a team can vote by behaviour, not by text.

    ``answer_signatures(requests, answers)`` gives one string per answer (``None`` where
    the answer does not run or has no action): two answers with equal signatures act
    alike, e.g. the same outputs of a function on the item's inputs, the same rows of a
    query, the same stdout of a command, or (multi-turn tasks, one request per turn) the
    same proposed action. Signatures never look at a gold answer or hidden tests.
    :class:`cycleqd.studies.team.TeamEngine` groups votes by them; a task without the method is
    voted on by exact (stripped) answer text.
    """

    def answer_signatures(self, requests: Sequence[GenRequest], answers: Sequence[str]) -> list[str | None]:
        ...
