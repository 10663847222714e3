"""mini_shell: one bash command over a few files, run in the sandbox and checked by its output."""
from __future__ import annotations

from typing import Sequence

from cycleqd.mini.items import MiniItem
from cycleqd.mini.shell import same_output
from cycleqd.registry import register_task
from cycleqd.sandbox import run_shell_batch
from cycleqd.tasks.base import SampleResult
from cycleqd.tasks.mini.base import MiniTask


@register_task("mini_shell")
class MiniShell(MiniTask):
    """Write one command; solved if its stdout equals the gold command's on the same files."""

    skill = "shell"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Gold outputs come from the same sandbox as the candidates (same sort order, same tools).
        self._gold: dict[str, str] = {}

    def score_outputs(self, items: Sequence[MiniItem], outputs: Sequence[str]) -> list[SampleResult]:
        todo = [it for it in items if it.id not in self._gold]
        jobs = [(dict(it.context["files"]), out) for it, out in zip(items, outputs)]
        jobs += [(dict(it.context["files"]), it.answer) for it in todo]
        runs = run_shell_batch(
            jobs, timeout=self._timeout, memory_mb=min(self.sandbox.memory_mb, 512), backend=self.sandbox.backend
        )
        for it, r in zip(todo, runs[len(items) :]):
            self._gold[it.id] = r.stdout
        results = []
        for it, out, r in zip(items, outputs, runs):
            if r.timed_out or r.error is not None:
                results.append(self._result(it, False, out, r.error or "timeout"))
                continue
            ok = bool(out.strip()) and same_output(r.stdout, self._gold[it.id])
            results.append(self._result(it, ok, out, None if ok else (r.stderr.strip()[-300:] or None)))
        return results
