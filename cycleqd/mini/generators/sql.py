"""Mini SQL: one SQLite query over a small table, from a one-line question.

Answers are checked by running the candidate and the gold query on the item's
table and comparing the result rows (as multisets unless the query orders them).
"""
from __future__ import annotations

import functools
import random
import sqlite3
from dataclasses import dataclass, replace
from typing import Any

from cycleqd.mini.items import Family
from cycleqd.sandbox.sqlite import SQLiteSandbox, SQLLimits

PREFIX = "sql"


@dataclass(frozen=True)
class Schema:
    """A table with a text key column, a numeric column and a category column."""

    table: str
    text: str
    num: str
    cat: str
    num_range: tuple[int, int]
    step: int
    names: tuple[str, ...]
    cats: tuple[str, ...]


SCHEMAS = (
    Schema("people", "name", "age", "city", (18, 80), 5,
           ("ann", "bob", "cy", "dan", "eve", "fay", "gus", "hal", "ivy", "jo"),
           ("oslo", "rome", "lima", "kyiv", "pune")),
    Schema("pets", "name", "weight", "kind", (1, 60), 5,
           ("rex", "tom", "kit", "max", "bo", "lou", "sam", "pip", "dot", "ace"),
           ("cat", "dog", "fish", "bird", "frog")),
    Schema("books", "title", "pages", "genre", (50, 900), 50,
           ("dune", "emma", "it", "ulysses", "odyssey", "beloved", "hamlet", "walden", "rebecca", "heidi"),
           ("scifi", "poem", "myth", "drama", "novel")),
    Schema("cars", "model", "price", "color", (5, 95), 5,
           ("golf", "polo", "mini", "civic", "swift", "yaris", "clio", "corsa", "ibiza", "fiesta"),
           ("red", "blue", "gray", "gold", "teal")),
    Schema("songs", "title", "plays", "style", (10, 990), 10,
           ("hey", "vogue", "one", "creep", "hurt", "wings", "faith", "angel", "smile", "toxic"),
           ("pop", "rock", "jazz", "folk", "soul")),
    Schema("towns", "town", "size", "land", (2, 98), 2,
           ("bree", "ely", "hove", "ayr", "wells", "ripon", "truro", "bude", "leek", "looe"),
           ("uk", "fr", "de", "it", "es")),
)


def _rows(rng: random.Random, s: Schema) -> list[tuple]:
    k = rng.randint(6, 9)
    names = rng.sample(s.names, k)
    nums = rng.sample(range(s.num_range[0], s.num_range[1] + 1), k)  # distinct: ORDER BY has no ties
    return [(nm, v, rng.choice(s.cats)) for nm, v in zip(names, nums)]


def _round(rng: random.Random, s: Schema, rows: list[tuple]) -> int:
    """A round threshold inside the table's values (round numbers are easy to copy)."""
    vals = sorted(r[1] for r in rows)
    lo, hi = vals[1], vals[-2]
    options = [v for v in range(0, s.num_range[1] + 1, s.step) if lo <= v <= hi]
    return rng.choice(options or [((lo + hi) // 2 // s.step) * s.step])


#: A table name takes an optional number suffix ("pets", "pets3": one table per shop, say):
#: every family then has a few hundred distinct questions, so each split holds a real sample.
SUFFIXES = ("",) + tuple(str(i) for i in range(1, 30))


def _fam(spec: str, query: str, ordered: bool = False) -> Family:
    def fam(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        s = rng.choice(SCHEMAS)
        s = replace(s, table=s.table + rng.choice(SUFFIXES))
        rows = _rows(rng, s)
        present = sorted({r[2] for r in rows})
        lo, hi = sorted(rng.sample(range(s.num_range[0] // s.step, s.num_range[1] // s.step + 1), 2))
        row = rng.choice(rows)
        fmt = dict(T=s.table, t=s.text, n=s.num, cat=s.cat, c=_round(rng, s, rows), v=rng.choice(present),
                   k=rng.randint(2, 5), lo=lo * s.step, hi=hi * s.step, x=row[0])
        ctx = {"table": s.table, "columns": (s.text, s.num, s.cat), "rows": rows, "ordered": ordered}
        return spec.format(**fmt), query.format(**fmt), ctx

    return fam


FAMILIES: dict[str, Family] = {
    "gt": _fam("{t} of {T} with {n} over {c}", "SELECT {t} FROM {T} WHERE {n} > {c};"),
    "lt": _fam("{t} of {T} with {n} under {c}", "SELECT {t} FROM {T} WHERE {n} < {c};"),
    "eq": _fam("{t} of {T} whose {cat} is {v}", "SELECT {t} FROM {T} WHERE {cat} = '{v}';"),
    "count": _fam("how many {T} with {n} over {c}", "SELECT COUNT(*) FROM {T} WHERE {n} > {c};"),
    "counteq": _fam("how many {T} have {cat} {v}", "SELECT COUNT(*) FROM {T} WHERE {cat} = '{v}';"),
    "max": _fam("largest {n} of {T} whose {cat} is {v}", "SELECT MAX({n}) FROM {T} WHERE {cat} = '{v}';"),
    "min": _fam("smallest {n} of {T} whose {cat} is {v}", "SELECT MIN({n}) FROM {T} WHERE {cat} = '{v}';"),
    "avg": _fam("average {n} of {T} whose {cat} is {v}", "SELECT AVG({n}) FROM {T} WHERE {cat} = '{v}';"),
    "sum": _fam("total {n} of {T} whose {cat} is {v}", "SELECT SUM({n}) FROM {T} WHERE {cat} = '{v}';"),
    "distinct": _fam("distinct {cat} of {T} with {n} over {c}", "SELECT DISTINCT {cat} FROM {T} WHERE {n} > {c};"),
    "between": _fam("{t} of {T} with {n} from {lo} to {hi}", "SELECT {t} FROM {T} WHERE {n} BETWEEN {lo} AND {hi};"),
    "under": _fam("how many {T} with {n} under {c}", "SELECT COUNT(*) FROM {T} WHERE {n} < {c};"),
}


class QueryError(Exception):
    """A candidate query failed to run."""


@functools.lru_cache(maxsize=8)
def _limits(max_steps: int) -> SQLLimits:
    return SQLLimits(max_steps=max_steps, max_rows=10_000)


def run_query(context: dict[str, Any], query: str, *, max_steps: int = 200_000) -> list[tuple]:
    """Run ``query`` on a fresh, read-only, in-memory copy of the item's table.

    The query runs in :class:`cycleqd.sandbox.sqlite.SQLiteSandbox` (no files, no
    extensions, bounded work and result size).

    Raises:
        QueryError: the query is invalid, writes, reaches outside its database, or runs too long.
    """
    t, (c1, c2, c3) = context["table"], context["columns"]

    def setup(con: sqlite3.Connection) -> None:
        con.execute(f"CREATE TABLE {t} ({c1} TEXT, {c2} INTEGER, {c3} TEXT)")
        con.executemany(f"INSERT INTO {t} VALUES (?, ?, ?)", [tuple(r) for r in context["rows"]])

    sandbox = SQLiteSandbox(_limits(max_steps), setup=setup, read_only=True)
    try:
        res = sandbox.run(query)
    finally:
        sandbox.close()
    if res.error is not None:
        raise QueryError(res.error)
    return res.rows


def same_result(got: list[tuple], want: list[tuple], ordered: bool) -> bool:
    """Rows equal (in order if ``ordered``, else as multisets); floats compared to 1e-6."""

    def norm(rows: list[tuple]) -> list[tuple]:
        return [tuple(round(v, 6) if isinstance(v, float) else v for v in r) for r in rows]

    g, w = norm(got), norm(want)
    if not ordered:
        g, w = sorted(g, key=repr), sorted(w, key=repr)
    return g == w
