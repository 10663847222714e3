"""What the three mini tasks share: items from a split, one greedy line per item, a checker."""
from __future__ import annotations

import time
from typing import Any, Callable, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from cycleqd.config import SandboxConfig
from cycleqd.engine.protocol import Engine, GenRequest
from cycleqd.mini.items import MiniItem
from cycleqd.mini.skills import skill_items
from cycleqd.tasks.protocol import SampleResult, Task, TaskResult

#: How many clean check runs of earlier answers a task keeps for reuse (see MiniCode, MiniShell).
SEEN = 50_000


class MiniTask(Task):
    """A procedurally generated mini task (see :mod:`cycleqd.mini`).

    Args:
        name: the task's name in the experiment.
        data: unused (items are generated); accepted for the common task signature.
        sandbox: sandbox settings for running model-written code.
        split: "val" (used during evolution), "test" (final tables) or "train".
        n: number of items.
        seed: which items are drawn (splits stay disjoint for every seed).
        skip: leave out the first ``skip`` items of this seed's draw, so that a second
            sample (e.g. for choosing models after evolution) shares no item with a
            first one of ``skip`` items.
    """

    class Options(BaseModel):
        """The options a config may give a mini task (see the class docstring)."""

        model_config = ConfigDict(frozen=True, extra="forbid")
        split: Literal["train", "val", "test"] = "val"
        n: int = Field(200, ge=1, le=10_000_000)
        seed: int = Field(0, ge=0)
        skip: int = Field(0, ge=0)

    skill: ClassVar[str]
    executes_code: ClassVar[bool] = True
    max_new_tokens: ClassVar[int] = 80

    def __init__(self, name: str, data: str | None = None, sandbox: SandboxConfig | None = None, **options: Any):
        super().__init__(name, data, sandbox, **options)
        o = self.options
        self.split = o.split
        self.items: list[MiniItem] = skill_items(self.skill, o.split, o.skip + o.n, o.seed)[o.skip:]
        self._by_id = {it.id: it for it in self.items}

    def sample_ids(self) -> list[str]:
        return [it.id for it in self.items]

    def requests(self, items: Sequence[MiniItem]) -> list[GenRequest]:
        """One raw-prompt request per item; the answer is the first generated line."""
        return [
            GenRequest(sample_id=it.id, prompt=it.prompt, max_new_tokens=self.max_new_tokens, stop=("\n",))
            for it in items
        ]

    def evaluate(self, engine: Engine, ids: Sequence[str] | None = None) -> TaskResult:
        """Generate an answer per item and check it. Quality = fraction of items solved.

        Raises:
            CodeExecutionNotAllowed: the task runs model-written code and the sandbox config does not allow it.
            KeyError: an unknown sample id.
        """
        return self.answer(engine, ids)()

    def answer(self, engine: Engine, ids: Sequence[str] | None = None) -> Callable[[], TaskResult]:
        """Generate the answers now; the call returned checks them and gives the :class:`TaskResult`.

        The check needs no engine, so it may run in another thread while the engine generates
        for another task (the worker does this; the sandbox's processes then use a free core).

        Raises:
            CodeExecutionNotAllowed: the task runs model-written code and the sandbox config does not allow it.
            KeyError: an unknown sample id.
        """
        if self.executes_code:
            from cycleqd.sandbox import require_code_execution

            require_code_execution(self.sandbox, self.name)
        start = time.perf_counter()
        items = self.items if ids is None else [self._by_id[str(i)] for i in ids]
        outputs = engine.generate(self.requests(items))
        generation = time.perf_counter() - start

        def check() -> TaskResult:
            begin = time.perf_counter()
            samples = self.score_outputs(items, outputs)
            quality = sum(s.score for s in samples) / len(samples) if samples else 0.0
            return TaskResult(self.name, quality, len(samples), tuple(samples),
                              generation + time.perf_counter() - begin)

        return check

    def score_outputs(self, items: Sequence[MiniItem], outputs: Sequence[str]) -> list[SampleResult]:
        """Check each output; a sample whose check fails to run scores 0 with an error."""
        raise NotImplementedError

    def answer_signatures(self, requests: Sequence[GenRequest], answers: Sequence[str]) -> list[str | None]:
        """What each answer does (see :class:`cycleqd.tasks.protocol.Votable`); here its stripped text.

        The executing tasks override this with the answer's execution result on the item's
        own inputs, never compared with the gold answer. Raises KeyError for an unknown sample id.
        """
        return [a.strip() or None for a in answers]

    def items_of(self, requests: Sequence[GenRequest]) -> list[MiniItem]:
        """The item each request asks about (KeyError for a request of another task)."""
        return [self._by_id[r.sample_id] for r in requests]

    @property
    def _timeout(self) -> float:
        # Mini answers are one-liners on tiny inputs; a long run means a bad answer.
        return min(self.sandbox.timeout, 5.0)

    @staticmethod
    def _result(item: MiniItem, ok: bool, output: str, error: str | None = None, **detail: Any) -> SampleResult:
        conversation = [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": output}]
        return SampleResult(item.id, 1.0 if ok else 0.0, error,
                            {"output": output, "conversation": conversation, **detail})
