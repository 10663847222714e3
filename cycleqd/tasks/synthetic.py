"""``synthetic``: a benchmark function of the genome, for dry runs and benchmarks (no model runs).

In the spirit of pyribs' benchmark functions (sphere, Rastrigin): a child's quality on a
synthetic task is a deterministic, smooth function of its genome, so the archives fill as in a
real run, while evaluation costs only ``latency_s`` (a fixed sleep, plus a uniform random
``latency_jitter_s``) standing in for GPU time. A run whose tasks are all synthetic is
*genome-only*: its workers load no engine and build no weights (see
:mod:`cycleqd.engine.genome_only`); only the factors of a tiny base are resident. Use it to check
a cluster, the workers, resume and plots end to end before spending GPU hours
(``experiments/dry_run.yaml``), and to measure the driver and the scaling (``make bench-scale``).

The function: with ``m`` the genome's mean task-vector coefficient per expert (``a.mean(0)``,
one number per expert) and ``r`` the RMS of its SVD coefficients ``d``,

    quality = 0.8 * exp(-|m - p|^2 / (2 width^2)) + 0.2 * exp(-(r - r0)^2 / (2 r0^2))

where the peak ``p`` is ``0.2`` for every expert and ``0.9`` for the task's own ``expert``
(its column in the genome, the task's position in the config by convention). An expert's seed
genome scores about 0.79 on its own task and 0.16 on the others; merges that mix the
experts and a little mutation score higher, up to 1.
"""
from __future__ import annotations

import math
import random
import time
from typing import Any, ClassVar, Sequence

from pydantic import BaseModel, ConfigDict, Field

from cycleqd.config import SandboxConfig
from cycleqd.registry import register_task
from cycleqd.tasks.protocol import SampleResult, Task, TaskResult


def synthetic_quality(a: Any, d: Any, expert: int, width: float = 0.5, r0: float = 0.02) -> float:
    """The synthetic quality of a genome's ``a`` ([T, K]) and ``d`` ([D]) for the skill of column ``expert``."""
    m = a.float().mean(0)
    K = int(m.numel())
    if not 0 <= expert < K:
        raise ValueError(f"synthetic: expert {expert} out of range for a genome of {K} experts")
    peak = [0.9 if k == expert else 0.2 for k in range(K)]
    dist2 = sum((float(m[k]) - peak[k]) ** 2 for k in range(K))
    r = float(d.float().pow(2).mean().sqrt()) if d.numel() else 0.0
    q = 0.8 * math.exp(-dist2 / (2 * width ** 2)) + 0.2 * math.exp(-((r - r0) ** 2) / (2 * r0 ** 2))
    return min(1.0, max(0.0, q))


@register_task("synthetic")
class Synthetic(Task):
    """A dry-run / benchmark task: quality from the genome itself, ``latency_s`` for the GPU time.

    Needs no model (``needs_model = False``): a run whose tasks are all synthetic loads no
    engine. Reads no data.
    """

    class Options(BaseModel):
        """``expert``: the genome column this skill rewards (the task's position in the config);
        ``latency_s``: seconds each evaluation sleeps; ``latency_jitter_s``: a uniform random extra
        delay up to this; ``width``: how far from the peak quality falls off (smaller: harder)."""

        model_config = ConfigDict(frozen=True, extra="forbid")
        expert: int = Field(0, ge=0)
        latency_s: float = Field(0.0, ge=0.0, le=3600.0)
        latency_jitter_s: float = Field(0.0, ge=0.0, le=3600.0)
        width: float = Field(0.5, gt=0.0)

    executes_code: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False

    def __init__(self, name: str, data: str | None = None, sandbox: SandboxConfig | None = None, **options: Any):
        super().__init__(name, data, sandbox, **options)
        self._jitter = random.Random(f"synthetic:{name}")

    def sample_ids(self) -> list[str]:
        return ["genome"]

    def evaluate(self, engine, ids: Sequence[str] | None = None) -> TaskResult:
        t0 = time.perf_counter()
        g = engine.current_genome()
        q = synthetic_quality(g.a, g.d, self.options.expert, self.options.width)
        delay = self.options.latency_s
        if self.options.latency_jitter_s:
            delay += self._jitter.uniform(0.0, self.options.latency_jitter_s)
        if delay:
            time.sleep(delay)
        return TaskResult(self.name, q, 1, (SampleResult("genome", q),), time.perf_counter() - t0)
