"""mini_regex: a regular expression from a description, checked by running it in the sandbox."""
from __future__ import annotations

from typing import Sequence

from cycleqd.mini.generators.regex import check_job, gold_matches, judge
from cycleqd.mini.items import MiniItem
from cycleqd.registry import register_task
from cycleqd.sandbox.verdict import evaluate_calls_batch
from cycleqd.tasks.mini_task import MiniTask
from cycleqd.tasks.protocol import SampleResult


@register_task("mini_regex")
class MiniRegex(MiniTask):
    """Write one pattern; solved if ``re.search`` accepts exactly the gold pattern's test strings.

    The pattern runs in the sandbox (it may backtrack for ever); which strings it accepts is
    judged here, against the gold pattern's matches (:mod:`cycleqd.sandbox.verdict`).

    The fourth mini skill: not part of the default world, it grows a run (see docs/grow.md).
    """

    skill = "regex"
    max_new_tokens = 40

    def score_outputs(self, items: Sequence[MiniItem], outputs: Sequence[str]) -> list[SampleResult]:
        jobs = [check_job(out, list(it.context["strings"])) for it, out in zip(items, outputs)]
        runs = evaluate_calls_batch(jobs, timeout=self._timeout, memory_mb=min(self.sandbox.memory_mb, 512),
                                    backend=self.sandbox.backend)
        results = []
        for it, out, res in zip(items, outputs, runs):
            err = judge(res, gold_matches(it.answer, list(it.context["strings"]))) if out.strip() else "empty answer"
            results.append(self._result(it, err is None, out, err))
        return results
