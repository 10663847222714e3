"""mini_code: a one-line Python function from a spec, run in the sandbox and judged outside it."""
from __future__ import annotations

from typing import Sequence

from cycleqd.engine.protocol import GenRequest
from cycleqd.mini.generators.code import check_job, gold_outputs, judge, probe_program
from cycleqd.mini.items import MiniItem
from cycleqd.recent import Recent
from cycleqd.registry import register_task
from cycleqd.sandbox import run_python_batch
from cycleqd.sandbox.verdict import evaluate_calls_batch
from cycleqd.tasks.mini_task import SEEN, MiniTask
from cycleqd.tasks.protocol import SampleResult


@register_task("mini_code")
class MiniCode(MiniTask):
    """Write ``def f(...): return ...``; solved if ``f`` gives the gold results on the item's inputs.

    The answer's ``f`` runs in the sandbox and only gives values; they are compared with the
    gold function's results here (:mod:`cycleqd.sandbox.verdict`), so an answer that exits
    early, prints a result or returns an object equal to everything scores 0. An answer that
    is the gold line itself is solved without a run. So is any answer judged cleanly before
    for the same item: related models, as a run's children are, repeat most of their
    answers. The last :data:`~cycleqd.tasks.mini_task.SEEN` such verdicts are kept; a
    timeout or a sandbox error is judged again.
    """

    skill = "code"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gold: dict[str, list] = {}
        self._seen: Recent[tuple[str, str], str | None] = Recent(SEEN)

    def _expected(self, item: MiniItem) -> list:
        if item.id not in self._gold:  # the gold line is this module's generated code: trusted
            self._gold[item.id] = gold_outputs(item.answer, [tuple(a) for a in item.context["inputs"]])
        return self._gold[item.id]

    def score_outputs(self, items: Sequence[MiniItem], outputs: Sequence[str]) -> list[SampleResult]:
        _unknown = object()
        known: list = [None if out == it.answer else self._seen.get((it.id, out), _unknown)
                       for it, out in zip(items, outputs)]
        ask = [k for k, v in enumerate(known) if v is _unknown]
        results = evaluate_calls_batch(
            [check_job(outputs[k], [tuple(a) for a in items[k].context["inputs"]]) for k in ask],
            timeout=self._timeout, memory_mb=min(self.sandbox.memory_mb, 512), backend=self.sandbox.backend)
        for k, res in zip(ask, results):
            known[k] = judge(res, self._expected(items[k]))
            if res.run.finished:  # a timeout may be the machine's load: judge it again next time
                self._seen[items[k].id, outputs[k]] = known[k]
        return [self._result(it, err is None, out, err) for it, out, err in zip(items, outputs, known)]

    def answer_signatures(self, requests: Sequence[GenRequest], answers: Sequence[str]) -> list[str | None]:
        """The printed results of each answer's ``f`` on its item's inputs (None if it does not run)."""
        from cycleqd.sandbox import require_code_execution

        require_code_execution(self.sandbox, self.name)
        items = self.items_of(requests)
        programs = [probe_program(a, [tuple(x) for x in it.context["inputs"]]) for it, a in zip(items, answers)]
        runs = run_python_batch(
            programs, timeout=self._timeout, memory_mb=min(self.sandbox.memory_mb, 512), backend=self.sandbox.backend
        )
        return [r.stdout if r.returncode == 0 and r.finished and a.strip() else None for r, a in zip(runs, answers)]
