"""Helpers shared by the real tasks: reading data, picking samples, and the
round-by-round multi-turn loop (one ``engine.generate`` call per round for every
live episode)."""
from __future__ import annotations

import json
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cycleqd.config import ConfigError
from cycleqd.engine.protocol import Engine, GenRequest, OverLongPrompt
from cycleqd.sandbox import require_code_execution
from cycleqd.tasks.protocol import SampleResult, Task, TaskResult


def read_rows(data: str | None, *, hf_split: str = "test") -> list[dict]:
    """Rows of a JSONL / JSON file, or of a Hub dataset given as ``hf://owner/name``.

    Raises:
        ConfigError: no data given, file missing, not JSON, or the Hub dataset cannot be loaded.
    """
    if not data:
        raise ConfigError("task needs `data` (a JSONL/JSON file or hf://owner/name)")
    if data.startswith("hf://"):
        name = data.removeprefix("hf://")
        try:
            import datasets  # optional, heavy: only for Hub data
        except ImportError:
            raise ConfigError(f"{data}: loading Hub datasets needs `pip install datasets`") from None
        try:
            return [dict(r) for r in datasets.load_dataset(name, split=hf_split)]
        except Exception as e:  # network / name errors are the user's input
            raise ConfigError(f"{data}: could not load dataset ({type(e).__name__}: {e})") from None
    path = Path(data)
    if not path.is_file():
        raise ConfigError(f"data file {data!r} not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            rows = json.loads(text)
            rows = rows if isinstance(rows, list) else [rows]
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(f"{data}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"{data}: every record must be a JSON object")
    return rows


def ids_as_strings(value: Any) -> Any:
    """Sample ids as strings (a config may list them as numbers); for ``ids`` option validators."""
    if value is None or isinstance(value, (str, bytes)):
        return value
    try:
        return [str(v) for v in value]
    except TypeError:
        return value


class DatasetOptions(BaseModel):
    """The options every dataset task takes: which samples (``select``: all or the official
    selection, ``ids``, ``limit``) and the generation budget per reply (``max_new_tokens``).
    A task's own options model extends it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    select: Literal["all", "official"] = "all"
    ids: list[str] | None = None
    limit: int | None = Field(None, ge=0)
    max_new_tokens: int = Field(512, ge=1, le=65536)

    _ids = field_validator("ids", mode="before")(ids_as_strings)


class DatasetTask(Task):
    """A task over a dataset's rows, scored on a selection of sample ids (``self._ids``, set by the
    subclass from ``select`` / ``ids`` / ``limit``)."""

    _ids: list[str]

    def sample_ids(self) -> list[str]:
        return list(self._ids)

    def chosen(self, ids: Sequence[Any] | None = None) -> list[str]:
        """The sample ids an evaluation scores: ``ids`` (each must be in the selection) or all of it.

        Raises:
            CodeExecutionNotAllowed: the task runs model code and ``sandbox.allow_code_execution`` is false.
            ConfigError: an id that is not in the selection.
        """
        if self.executes_code:
            require_code_execution(self.sandbox, self.name)
        return select_ids(self._ids, ids, None) if ids is not None else list(self._ids)

    def evaluate(self, engine: Engine, ids: Sequence[str] | None = None) -> TaskResult:
        """Score the chosen samples (``ids``, default all) with ``engine`` (:meth:`score`); quality is
        the mean sample score.

        Raises:
            CodeExecutionNotAllowed: the task runs model code and ``sandbox.allow_code_execution`` is false.
            ConfigError: an id that is not in the selection.
        """
        chosen = self.chosen(ids)
        start = time.monotonic()
        return task_result(self.name, self.score(engine, chosen), start)

    def score(self, engine: Engine, chosen: list[str]) -> list[SampleResult]:
        """One result per id of ``chosen``, in order: the task's own way of answering and judging."""
        raise NotImplementedError(f"{type(self).__name__} scores its samples in evaluate()")


def select_ids(all_ids: Sequence[str], ids: Iterable[Any] | None, limit: int | None) -> list[str]:
    """``ids`` (any order, as strings) restricted to known ones, then the first ``limit``.

    Raises:
        ConfigError: an id that is not a sample of the task.
    """
    if ids is None:
        chosen = list(all_ids)
    else:
        known = set(all_ids)
        chosen = [str(i) for i in ids]
        bad = [i for i in chosen if i not in known]
        if bad:
            raise ConfigError(f"unknown sample id(s) {bad[:5]} (the task has {len(all_ids)} samples)")
    return chosen[:limit] if limit is not None else chosen


def task_result(task: str, samples: Sequence[SampleResult], start: float) -> TaskResult:
    """TaskResult with quality = mean sample score (0 for no samples)."""
    n = len(samples)
    quality = sum(s.score for s in samples) / n if n else 0.0
    return TaskResult(task=task, quality=quality, n=n, samples=tuple(samples), seconds=time.monotonic() - start)


def error_text(e: BaseException) -> str:
    """One line naming an exception (the traceback's last frame included)."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


class Episode(Protocol):
    """One multi-turn sample: the conversation so far, and what to do with a reply."""

    sample_id: str
    messages: list[dict[str, str]]
    done: bool
    turn: int
    #: ``"official"``: its chat prompts are tokenised as the official code's were (a second BOS).
    protocol: str

    def step(self, reply: str) -> None:
        """Act on the model's reply (run SQL / bash); set ``done`` when the episode ends."""
        ...


def run_episodes(engine: Engine, episodes: Sequence[Episode], *, max_new_tokens: int,
                 workers: int = 8, prompt: Callable[[Episode], dict] | None = None,
                 overlong: dict[str, int] | None = None) -> dict[str, str]:
    """Drive episodes round by round: one generate call per round for all live episodes.

    Replies are acted on in parallel threads (each episode owns its own database or
    shell). An episode whose step raises is ended with the error recorded. Episodes of
    protocol ``official`` send their chat prompts with ``special_tokens`` (see
    :class:`~cycleqd.engine.protocol.GenRequest`). A prompt longer than the engine takes
    gets ``""`` (:class:`~cycleqd.engine.protocol.OverLongPrompt`) and its episode goes on
    with that reply; ``overlong``, when given, counts them per sample id.

    Returns:
        sample_id -> error text for the episodes that failed with an exception.
    """
    errors: dict[str, str] = {}

    def act(pair: tuple[Episode, str]) -> None:
        ep, reply = pair
        try:
            ep.step(reply)
        except Exception as e:  # one broken episode must not end the others
            errors[ep.sample_id] = error_text(e)
            ep.done = True

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        while True:
            live = [ep for ep in episodes if not ep.done]
            if not live:
                break
            requests = []
            for ep in live:
                extra = prompt(ep) if prompt else {"messages": tuple(dict(m) for m in ep.messages)}
                official = getattr(ep, "protocol", None) == "official" and "messages" in extra
                requests.append(GenRequest(sample_id=ep.sample_id, turn=ep.turn, max_new_tokens=max_new_tokens,
                                           special_tokens=official, **extra))
            try:
                replies = engine.generate(requests)
            except Exception as e:  # the model failing ends every live episode as failed
                for ep in live:
                    errors[ep.sample_id] = f"generation failed: {error_text(e)}"
                    ep.done = True
                break
            if overlong is not None:
                for ep, reply in zip(live, replies):
                    if isinstance(reply, OverLongPrompt):
                        overlong[ep.sample_id] = overlong.get(ep.sample_id, 0) + 1
            list(pool.map(act, zip(live, replies)))
    return errors
