"""``likelihood``: how probable a model finds reference texts.

quality = exp(mean per-token log-probability of the texts), in (0, 1]. A cheap,
deterministic, real skill signal (e.g. held-out text of one domain per expert);
no generation and no code execution. Data: a JSONL of {"text": ...} (or {"id":,
"text":}) or a plain text file with one sample per line.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, ClassVar, Sequence

from pydantic import BaseModel, ConfigDict, Field

from cycleqd.config import ConfigError, SandboxConfig
from cycleqd.registry import register_task
from cycleqd.tasks.protocol import SampleResult, Task, TaskResult


def _read_texts(path: str) -> list[tuple[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"likelihood data {path!r} not found")
    rows = []
    for i, line in enumerate(p.read_text().splitlines()):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            r = json.loads(line)
            rows.append((str(r.get("id", i)), r["text"]))
        else:
            rows.append((str(i), line))
    if not rows:
        raise ConfigError(f"likelihood data {path!r} holds no texts")
    return rows


@register_task("likelihood")
class Likelihood(Task):
    """Scores exp(mean token log-likelihood) of fixed texts, through ``engine.sequence_logprobs``."""

    class Options(BaseModel):
        """``batch_size``: texts per forward pass."""

        model_config = ConfigDict(frozen=True, extra="forbid")
        batch_size: int = Field(16, ge=1)

    executes_code: ClassVar[bool] = False

    def __init__(self, name: str, data: str | None, sandbox: SandboxConfig | None = None, **options: Any):
        super().__init__(name, data, sandbox, **options)
        if data is None:
            raise ConfigError(f"task {name}: likelihood needs data")
        self.rows = _read_texts(data)
        self.batch_size = self.options.batch_size

    def sample_ids(self) -> list[str]:
        return [i for i, _ in self.rows]

    def evaluate(self, engine, ids: Sequence[str] | None = None) -> TaskResult:
        t0 = time.perf_counter()
        rows = [r for r in self.rows if ids is None or r[0] in set(ids)]
        # The engine scores the texts: its weights are whatever was last loaded into it.
        scored = engine.sequence_logprobs([t for _, t in rows], batch_size=self.batch_size)
        samples = []
        total, count = 0.0, 0
        for (sid, _), (s, m) in zip(rows, scored):
            n = max(m, 1)
            samples.append(SampleResult(sid, math.exp(s / n)))
            total += s
            count += n
        quality = math.exp(total / max(count, 1))
        return TaskResult(self.name, quality, len(samples), tuple(samples), time.perf_counter() - t0)
