"""mini_sql: one SQLite query from a question, checked by comparing result rows (SQLite in process)."""
from __future__ import annotations

from typing import Sequence

from cycleqd.engine.protocol import GenRequest
from cycleqd.mini.generators.sql import QueryError, run_query, same_result
from cycleqd.mini.items import MiniItem
from cycleqd.registry import register_task
from cycleqd.tasks.mini_task import MiniTask
from cycleqd.tasks.protocol import SampleResult


@register_task("mini_sql")
class MiniSQL(MiniTask):
    """Write one query; solved if it returns the gold query's rows on the item's table.

    Queries run read-only in :class:`cycleqd.sandbox.sqlite.SQLiteSandbox` (a private
    in-memory database with bounded work and no way out), like the DB task's SQL,
    so no sandbox opt-in is needed.
    """

    skill = "sql"
    executes_code = False

    def _gold(self, it: MiniItem) -> list[tuple]:
        # Items never change: the gold rows are computed once per item, not per child.
        cache: dict[str, list[tuple]] = self.__dict__.setdefault("_gold_rows", {})
        if it.id not in cache:
            cache[it.id] = run_query(dict(it.context), it.answer)
        return cache[it.id]

    def score_outputs(self, items: Sequence[MiniItem], outputs: Sequence[str]) -> list[SampleResult]:
        results = []
        for it, out in zip(items, outputs):
            ctx = dict(it.context)
            want = self._gold(it)
            try:
                got = run_query(ctx, out)
            except QueryError as e:
                results.append(self._result(it, False, out, str(e)))
                continue
            results.append(self._result(it, same_result(got, want, bool(ctx["ordered"])), out))
        return results

    def answer_signatures(self, requests: Sequence[GenRequest], answers: Sequence[str]) -> list[str | None]:
        """The rows each query returns on its item's table (sorted unless order matters); None on error."""
        out: list[str | None] = []
        for it, a in zip(self.items_of(requests), answers):
            ctx = dict(it.context)
            try:
                rows = [tuple(round(v, 6) if isinstance(v, float) else v for v in r) for r in run_query(ctx, a)]
            except QueryError:
                out.append(None)
                continue
            out.append(repr(rows if ctx["ordered"] else sorted(rows, key=repr)))
        return out
