"""mini_code: a one-line Python function from a spec, checked by asserts run in the sandbox."""
from __future__ import annotations

from typing import Sequence

from cycleqd.mini.code import check_program, gold_outputs
from cycleqd.mini.items import MiniItem
from cycleqd.registry import register_task
from cycleqd.sandbox import run_python_batch
from cycleqd.tasks.base import SampleResult
from cycleqd.tasks.mini.base import MiniTask


@register_task("mini_code")
class MiniCode(MiniTask):
    """Write ``def f(...): return ...``; solved if all asserts on the item's inputs pass."""

    skill = "code"

    def score_outputs(self, items: Sequence[MiniItem], outputs: Sequence[str]) -> list[SampleResult]:
        programs = []
        for it, out in zip(items, outputs):
            inputs = [tuple(a) for a in it.context["inputs"]]
            programs.append(check_program(out, inputs, gold_outputs(it.answer, inputs)))
        runs = run_python_batch(
            programs, timeout=self._timeout, memory_mb=min(self.sandbox.memory_mb, 512), backend=self.sandbox.backend
        )
        results = []
        for it, out, r in zip(items, outputs, runs):
            ok = r.returncode == 0 and not r.timed_out and r.error is None
            err = None if ok else (r.error or ("timeout" if r.timed_out else r.stderr.strip()[-300:] or "failed"))
            results.append(self._result(it, ok, out, err))
        return results
