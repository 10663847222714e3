"""mini_shell: one bash command over a few files, run in the sandbox and checked by its output."""
from __future__ import annotations

from typing import Sequence

from cycleqd.engine.protocol import GenRequest
from cycleqd.mini.generators.shell import same_output
from cycleqd.mini.items import MiniItem
from cycleqd.recent import Recent
from cycleqd.registry import register_task
from cycleqd.sandbox import RunResult, run_shell_batch
from cycleqd.tasks.mini_task import SEEN, MiniTask
from cycleqd.tasks.protocol import SampleResult


@register_task("mini_shell")
class MiniShell(MiniTask):
    """Write one command; solved if its stdout equals the gold command's on the same files.

    The gold command runs once per item in the same sandbox as the candidates (same sort
    order, same tools), each job in its own ``/tmp`` and working folder, so no answer can
    fill space a gold run needs; a gold run is kept only when it ran clean (finished, exit
    0, no timeout, no sandbox error), else it runs again with the next batch and the
    item's answers score 0 meanwhile. An answer that is the gold command itself is that
    same run, so it is not run again. Nor is any command that ran cleanly for the same item before (same
    files, a fresh folder): related models repeat most of their answers. The last
    :data:`~cycleqd.tasks.mini_task.SEEN` such runs are kept; a timeout or a sandbox error
    is run again.
    """

    skill = "shell"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gold: dict[str, RunResult] = {}
        self._seen: Recent[tuple[str, str], RunResult] = Recent(SEEN)

    @staticmethod
    def _clean(r: RunResult) -> bool:
        """A run that may stand for its command: finished, no timeout, no sandbox error, exit 0."""
        return r.finished and not r.timed_out and r.error is None and r.returncode == 0

    def _known(self, item: MiniItem, output: str) -> RunResult | None:
        # a run stands for the answer only if it ran cleanly (a timeout may be load)
        r = self._gold.get(item.id) if output == item.answer else self._seen.get((item.id, output))
        return r if r is not None and r.finished else None

    def score_outputs(self, items: Sequence[MiniItem], outputs: Sequence[str]) -> list[SampleResult]:
        todo = list({it.id: it for it in items if it.id not in self._gold}.values())
        known = [self._known(it, out) for it, out in zip(items, outputs)]
        ask = [k for k, r in enumerate(known) if r is None and not (outputs[k] == items[k].answer
                                                                        and items[k].id in {t.id for t in todo})]
        jobs = [(dict(items[k].context["files"]), outputs[k]) for k in ask]
        jobs += [(dict(it.context["files"]), it.answer) for it in todo]
        runs = run_shell_batch(
            jobs, timeout=self._timeout, memory_mb=min(self.sandbox.memory_mb, 512), backend=self.sandbox.backend
        )
        gold_now = dict(zip((it.id for it in todo), runs[len(ask):]))
        for item_id, r in gold_now.items():
            if self._clean(r):  # only a clean gold run is kept: a failed one is run again next time
                self._gold[item_id] = r
        for k, r in zip(ask, runs):
            if r.finished:
                self._seen[items[k].id, outputs[k]] = r
        mine = dict(zip(ask, runs))
        results = []
        for k, (it, out) in enumerate(zip(items, outputs)):
            gold = self._gold.get(it.id)
            if gold is None:
                why = gold_now[it.id].error or f"exit code {gold_now[it.id].returncode}"
                results.append(self._result(it, False, out, f"the gold command did not run cleanly ({why})"))
                continue
            r = mine.get(k) or known[k] or gold  # the gold answer itself: its own run
            if not r.finished:
                results.append(self._result(it, False, out, r.error or "timeout"))
                continue
            ok = bool(out.strip()) and same_output(r.stdout, gold.stdout)
            results.append(self._result(it, ok, out, None if ok else (r.stderr.strip()[-300:] or None)))
        return results

    def answer_signatures(self, requests: Sequence[GenRequest], answers: Sequence[str]) -> list[str | None]:
        """Each command's stdout on its item's files (trailing blanks dropped); None if it did not finish."""
        from cycleqd.sandbox import require_code_execution

        require_code_execution(self.sandbox, self.name)
        items = self.items_of(requests)
        runs = run_shell_batch([(dict(it.context["files"]), a) for it, a in zip(items, answers)],
                               timeout=self._timeout, memory_mb=min(self.sandbox.memory_mb, 512),
                               backend=self.sandbox.backend)
        norm = lambda s: "\n".join(line.rstrip() for line in s.rstrip().splitlines())  # noqa: E731
        return [norm(r.stdout) if a.strip() and r.finished else None
                for r, a in zip(runs, answers)]
