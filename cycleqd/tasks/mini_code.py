"""mini_code: a one-line Python function from a spec, checked by asserts run in the sandbox."""
from __future__ import annotations

from typing import Sequence

from cycleqd.engine.protocol import GenRequest
from cycleqd.mini.generators.code import check_program, gold_outputs, probe_program
from cycleqd.mini.items import MiniItem
from cycleqd.recent import Recent
from cycleqd.registry import register_task
from cycleqd.sandbox import RunResult, run_python_batch
from cycleqd.tasks.mini_task import SEEN, MiniTask
from cycleqd.tasks.protocol import SampleResult


@register_task("mini_code")
class MiniCode(MiniTask):
    """Write ``def f(...): return ...``; solved if all asserts on the item's inputs pass.

    The gold answer's own check program runs once per item (with the first candidates);
    an answer that is the gold answer itself makes that same program, so its run is
    reused: good models write the gold line for most items. So is the clean run of any
    answer checked before for the same item (the program is the same, it runs in a fresh
    folder): related models, as a run's children are, repeat most of their answers. The
    last :data:`~cycleqd.tasks.mini_task.SEEN` such runs are kept; a timeout or a sandbox
    error is run again.
    """

    skill = "code"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gold_run: dict[str, RunResult] = {}
        self._seen: Recent[tuple[str, str], RunResult] = Recent(SEEN)

    def _known(self, item: MiniItem, output: str) -> RunResult | None:
        if output == item.answer and item.id in self._gold_run:
            return self._gold_run[item.id]
        return self._seen.get((item.id, output))

    def _program(self, item: MiniItem, output: str) -> str:
        inputs = [tuple(a) for a in item.context["inputs"]]
        return check_program(output, inputs, gold_outputs(item.answer, inputs))

    def score_outputs(self, items: Sequence[MiniItem], outputs: Sequence[str]) -> list[SampleResult]:
        todo = list({it.id: it for it in items if it.id not in self._gold_run}.values())
        known = [self._known(it, out) for it, out in zip(items, outputs)]
        ask = [k for k, r in enumerate(known) if r is None]
        programs = [self._program(items[k], outputs[k]) for k in ask]
        programs += [self._program(it, it.answer) for it in todo]
        runs = run_python_batch(
            programs, timeout=self._timeout, memory_mb=min(self.sandbox.memory_mb, 512), backend=self.sandbox.backend
        )
        for it, r in zip(todo, runs[len(ask) :]):
            if r.finished:  # a timeout may be the machine's load: run it again next time
                self._gold_run[it.id] = r
        for k, r in zip(ask, runs):
            if r.finished:
                self._seen[items[k].id, outputs[k]] = r
        mine = dict(zip(ask, runs))
        runs = [mine.get(k, known[k]) for k in range(len(items))]
        results = []
        for it, out, r in zip(items, outputs, runs):
            ok = r.returncode == 0 and r.finished
            err = None if ok else (r.error or ("timeout" if r.timed_out else r.stderr.strip()[-300:] or "failed"))
            results.append(self._result(it, ok, out, err))
        return results

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
