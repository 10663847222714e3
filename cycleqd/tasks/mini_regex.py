"""mini_regex: a regular expression from a description, checked by running it in the sandbox."""
from __future__ import annotations

from typing import Sequence

from cycleqd.mini.generators.regex import check_program, gold_matches
from cycleqd.mini.items import MiniItem
from cycleqd.registry import register_task
from cycleqd.sandbox import run_python_batch
from cycleqd.tasks.mini_task import MiniTask
from cycleqd.tasks.protocol import SampleResult


@register_task("mini_regex")
class MiniRegex(MiniTask):
    """Write one pattern; solved if ``re.search`` accepts exactly the gold pattern's test strings.

    The fourth mini skill: not part of the default world, it grows a run (see docs/grow.md).
    """

    skill = "regex"
    max_new_tokens = 40

    def score_outputs(self, items: Sequence[MiniItem], outputs: Sequence[str]) -> list[SampleResult]:
        programs = []
        for it, out in zip(items, outputs):
            strings = list(it.context["strings"])
            programs.append(check_program(out, strings, gold_matches(it.answer, strings)))
        runs = run_python_batch(
            programs, timeout=self._timeout, memory_mb=min(self.sandbox.memory_mb, 512), backend=self.sandbox.backend
        )
        results = []
        for it, out, r in zip(items, outputs, runs):
            ok = bool(out.strip()) and r.returncode == 0 and r.finished
            err = None if ok else (r.error or ("timeout" if r.timed_out else r.stderr.strip()[-300:] or "failed"))
            results.append(self._result(it, ok, out, err))
        return results
