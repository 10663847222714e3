"""ShellText: the mini world's shell requests, solved when the answer is the gold command's text.

No code runs (``executes_code = False``): the check compares text.
"""
from __future__ import annotations

import time
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field

from cycleqd.engine.protocol import Engine, GenRequest
from cycleqd.mini.skills import skill_items
from cycleqd.tasks.protocol import SampleResult, Task, TaskResult


class ShellText(Task):
    """Write the shell command a request asks for; solved if it is the gold command, character for character."""

    class Options(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")
        split: str = "val"
        n: int = Field(20, ge=1)
        seed: int = 0

    executes_code = False

    def __init__(self, name, data=None, sandbox=None, **options):
        super().__init__(name, data, sandbox, **options)
        self.items = skill_items("shell", self.options.split, self.options.n, self.options.seed)
        self.by_id = {it.id: it for it in self.items}

    def sample_ids(self) -> list[str]:
        return [it.id for it in self.items]

    def evaluate(self, engine: Engine, ids: Sequence[str] | None = None) -> TaskResult:
        t0 = time.perf_counter()
        items = self.items if ids is None else [self.by_id[i] for i in ids]
        outs = engine.generate([GenRequest(sample_id=it.id, prompt=it.prompt, max_new_tokens=80, stop=("\n",))
                                for it in items])
        samples = tuple(SampleResult(it.id, float(o.strip() == it.answer), None, {"output": o})
                        for it, o in zip(items, outs))
        return TaskResult(self.name, sum(s.score for s in samples) / len(samples), len(samples), samples,
                          time.perf_counter() - t0)
