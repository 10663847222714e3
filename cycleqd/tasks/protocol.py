"""Typed results every task returns, and the Task protocol."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol, Sequence

from pydantic import BaseModel, ConfigDict

from cycleqd.config import SandboxConfig, validate_options
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


def episodes_of(task: str, kind: str, result: TaskResult) -> list[dict]:
    """The passing samples of a :class:`~cycleqd.tasks.protocol.TaskResult` with their conversations.

    One record per solved sample, ``{"task", "kind", "id", "score", "conversation"}``, the
    conversation as chat messages; a task run several times (OS ``runs``) gives the first
    passing run's. Samples without a conversation (e.g. likelihood tasks) give nothing.
    """
    out = []
    for s in result.samples:
        detail = s.detail or {}
        if isinstance(detail.get("runs"), list) and isinstance(detail.get("scores"), list):
            convs = [d.get("conversation") for d, sc in zip(detail["runs"], detail["scores"]) if sc >= 1.0]
        else:
            convs = [detail.get("conversation")] if s.score >= 1.0 else []
        convs = [c for c in convs if c]
        if convs:
            out.append({"task": task, "kind": kind, "id": str(s.id), "score": float(s.score),
                        "conversation": [{"role": m["role"], "content": m["content"]} for m in convs[0]]})
    return out


def text_signatures(answers: Sequence[str]) -> list[str | None]:
    """Signatures by exact (stripped) answer text: the vote of tasks that cannot say what an answer does."""
    return [a.strip() or None for a in answers]


class Task:
    """A skill benchmark that scores a model (an :class:`~cycleqd.engine.protocol.Engine`).

    ``evaluate`` never raises for a bad sample: it records a failed sample. Every
    capability a caller uses is declared here, so nothing probes a task with ``getattr``.

    Attributes:
        name: the task's name in the config (its archive axis).
        executes_code: True if scoring runs model-written code (needs
            ``sandbox.allow_code_execution``, checked before any model loads).
        needs_model: False if the task scores the genome itself (``kind: synthetic``); when no
            task of a run needs a model, workers load no engine (genome-only mode).
    """

    class Options(BaseModel):
        """A task's options (none by default); a task class declares its own, each option once."""

        model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    executes_code: ClassVar[bool] = False
    needs_model: ClassVar[bool] = True

    def __init__(self, name: str, data: str | None = None, sandbox: SandboxConfig | None = None, **options: Any):
        """Args:
            name: the task's name in the experiment (its archive axis).
            data: where the task's samples are (a file, folder or ``hf://`` id), if it reads any.
            sandbox: the experiment's sandbox settings (default: SandboxConfig()).
            options: the config's ``options`` of the task, validated into ``self.options``.

        Raises:
            ConfigError: an unknown option or a bad value, in one line.
        """
        self.name, self.data = name, data
        self.sandbox = sandbox or SandboxConfig()
        self.options = validate_options(type(self).Options, name, options)

    def sample_ids(self) -> list[str]:
        """The ids of the samples ``evaluate`` scores by default."""
        raise NotImplementedError

    def evaluate(self, engine: Engine, ids: Sequence[str] | None = None) -> TaskResult:
        """Score ``engine`` on the samples ``ids`` (default: all)."""
        raise NotImplementedError

    def answer(self, engine: Engine, ids: Sequence[str] | None = None) -> Callable[[], TaskResult]:
        """Generate now, check later: the returned call gives the :class:`TaskResult` and needs no engine.

        A task whose checks do not need the engine overrides this, so a worker can check one
        task's answers in another thread while the engine generates for the next; the default
        evaluates at once.
        """
        result = self.evaluate(engine, ids)
        return lambda: result

    def answer_signatures(self, requests: Sequence[GenRequest], answers: Sequence[str]) -> list[str | None]:
        """What each answer *does*, for a team's vote (see :class:`Votable`); default: its stripped text."""
        return text_signatures(answers)


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
