"""Model-written SQL on SQLite, contained in process.

Model SQL is hostile input. Each :class:`SQLiteSandbox` is a private in-memory
database (temporary tables and sorts stay in memory too, so nothing is ever
written to the host) locked down before the first untrusted statement:

- rights: an authorizer refuses ATTACH / DETACH (which also covers every form of
  VACUUM, since SQLite attaches its target internally), ``load_extension`` and
  other functions that reach outside the database, and every pragma outside a
  short allow-list of ones that only read the schema or flip harmless switches;
  extension loading is never enabled and at most zero databases may be attached;
- time: a progress handler stops each statement past its wall-clock limit or its
  budget of virtual-machine steps (a runaway recursive CTE ends in an error);
- memory: ``sqlite3`` limits bound one value, one statement's text, expression
  depth, compound selects and the like; a statement that makes the process grow
  past its memory limit (a huge sort) is stopped; results are fetched as a stream
  and cut at a row cap and a byte cap, so a huge result never sits in the worker.

:class:`cycleqd.sandbox.mysql.MySQLSandbox` gives the same contract on a MySQL /
MariaDB server; both answer with :class:`QueryResult`.
"""
from __future__ import annotations

import ctypes
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field


class SQLLimits(BaseModel):
    """What one untrusted statement may use.

    Args:
        seconds: wall-clock time per statement.
        max_steps: SQLite virtual-machine steps per statement (bounds work, and the
            memory a sort or recursive query can build up, independently of the clock).
        max_rows / max_bytes: the most rows / bytes (approximate, of the values)
            fetched from one result; the rest is dropped and ``truncated`` is set.
        max_sql_chars: longest statement text accepted.
        max_value_bytes: longest string or blob a statement may build.
        max_database_mb: how large the database (and its temporary tables) may grow
            over the whole session: memory, statement after statement.
        max_depth: deepest nesting of parentheses accepted (parser stacks are finite).
        max_memory_mb: how much the process may grow while one statement runs (a sort
            or a recursive query builds its state in memory before the first row).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    seconds: float = Field(2.0, gt=0)
    max_steps: int = Field(200_000_000, gt=0)
    max_rows: int = Field(10_000, gt=0)
    max_bytes: int = Field(1 << 20, gt=0)
    max_sql_chars: int = Field(100_000, gt=0)
    max_value_bytes: int = Field(100_000, gt=0)
    max_memory_mb: int = Field(128, gt=0)
    max_depth: int = Field(100, gt=0)
    max_database_mb: int = Field(64, gt=0)


@dataclass(frozen=True)
class QueryResult:
    """Outcome of one untrusted statement.

    ``columns`` is None for a statement without a result set (INSERT, CREATE, ...);
    ``rows`` holds at most the limits' rows and bytes (``truncated`` says whether more
    existed); ``error`` is the database's (or the sandbox's) error text, else None.
    """

    columns: tuple[str, ...] | None
    rows: list[tuple]
    truncated: bool = False
    error: str | None = None


DEFAULT_LIMITS = SQLLimits()
_TICK = 1000  # VM steps between progress-handler calls
_MEMORY_EVERY = 64  # progress-handler calls between looks at the process's size
_PAGE = 4096


def _resident_mb() -> float:
    """This process's resident memory (read fresh: a forked worker must see its own)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0

# Pragmas that only read the schema or state, with or without an argument.
_QUERY_PRAGMAS = frozenset({
    "table_info", "table_xinfo", "table_list", "index_info", "index_xinfo", "index_list",
    "foreign_key_list", "foreign_key_check", "collation_list", "function_list", "module_list",
    "pragma_list", "compile_options", "integrity_check", "quick_check", "encoding", "data_version",
    "schema_version", "page_size", "page_count", "freelist_count",
})
# Pragmas that may also be set: switches of query semantics, no files, no memory.
_SET_PRAGMAS = frozenset({
    "foreign_keys", "case_sensitive_like", "recursive_triggers", "reverse_unordered_selects",
    "defer_foreign_keys", "legacy_alter_table", "user_version", "application_id",
})
# Functions that reach outside the database (files, extensions, raw pointers).
_DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit", "fsdir"})


def _first_word(sql: str) -> str:
    """The statement's first keyword, lower-cased, after white space and comments.

    A plain scan rather than a regular expression: model output is hostile, and a
    pattern that repeats comments or blanks backtracks exponentially on crafted text.
    """
    i, n = 0, len(sql)
    while i < n:
        if sql[i].isspace():
            i += 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            break
    j = i
    while j < n and (sql[j].isalnum() or sql[j] == "_"):
        j += 1
    return sql[i:j].lower()


def _authorize(action: int, arg1: str | None, arg2: str | None, _db: str | None, _trigger: str | None) -> int:
    if action == sqlite3.SQLITE_PRAGMA:
        name = (arg1 or "").lower()
        if name in _QUERY_PRAGMAS and (arg2 is None or name not in ("schema_version", "page_size", "encoding")):
            return sqlite3.SQLITE_OK
        return sqlite3.SQLITE_OK if name in _SET_PRAGMAS else sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if (arg2 or "").lower() in _DENIED_FUNCTIONS else sqlite3.SQLITE_OK
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def value_bytes(row: tuple) -> int:
    """Approximate size of a fetched row (what the byte cap counts)."""
    return 16 + sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row)


def fetch_capped(cur: Any, limits: SQLLimits) -> QueryResult:
    """The rows of an executed cursor, streamed in small batches and cut at the row / byte caps.

    A huge result is cut, never held. ``QueryResult.truncated`` says the caps were reached
    (the caller may then stop the statement on the server).
    """
    if cur.description is None:
        return QueryResult(None, [])
    columns = tuple(d[0] for d in cur.description)
    rows: list[tuple] = []
    size = 0
    while True:
        batch = cur.fetchmany(256)
        if not batch:
            return QueryResult(columns, rows)
        for r in batch:
            size += value_bytes(r)
            if len(rows) >= limits.max_rows or size > limits.max_bytes:
                return QueryResult(columns, rows, True)
            rows.append(tuple(r))


def _nesting(sql: str) -> int:
    """Deepest parenthesis nesting outside quotes and comments."""
    depth = deepest = 0
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`[":
            close = "]" if c == "[" else c
            j = sql.find(close, i + 1)
            i = n if j < 0 else j + 1
            continue
        if sql.startswith("--", i) or c == "#":
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        if c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


def refusal(sql: object, limits: SQLLimits) -> str | None:
    """Why a statement is refused before it reaches any database (None: it may run)."""
    if not isinstance(sql, str):
        return "statement refused: not text"
    if len(sql) > limits.max_sql_chars:
        return f"statement refused: longer than {limits.max_sql_chars} characters"
    # Counting is cheap in C; the scan runs only for statements that could be too deep.
    if sql.count("(") > limits.max_depth and _nesting(sql) > limits.max_depth:
        return f"statement refused: nested deeper than {limits.max_depth} parentheses"
    return None


def _give_back_memory() -> None:
    """Return freed heap to the system after a statement that grew the process."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class SQLiteSandbox:
    """A private in-memory SQLite database that runs untrusted statements within limits.

    Args:
        limits: per-statement limits (see :class:`SQLLimits`).
        setup: trusted set-up (create and fill tables, register functions), run on the
            connection before it is locked down.
        read_only: refuse every write after set-up (``PRAGMA query_only``).

    The harness's own queries go through :meth:`run` too (with their own limits):
    after untrusted SQL has run, nothing about the database can be trusted.
    """

    def __init__(self, limits: SQLLimits = DEFAULT_LIMITS, *,
                 setup: Callable[[sqlite3.Connection], None] | None = None, read_only: bool = False):
        self.limits = limits
        self._deadline = 0.0
        self._ticks_left = self._ticks = 0
        self._stop: str | None = None
        self._memory_base = 0.0
        con = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        try:
            # In memory: a big sort or temporary table must not spill into files on the host.
            con.execute("PRAGMA temp_store = MEMORY")
            for limit, value in (
                (sqlite3.SQLITE_LIMIT_ATTACHED, 0),
                (sqlite3.SQLITE_LIMIT_LENGTH, limits.max_value_bytes),
                (sqlite3.SQLITE_LIMIT_SQL_LENGTH, limits.max_sql_chars),
                (sqlite3.SQLITE_LIMIT_EXPR_DEPTH, 200),
                (sqlite3.SQLITE_LIMIT_COMPOUND_SELECT, 100),
                (sqlite3.SQLITE_LIMIT_VDBE_OP, 250_000),
                (sqlite3.SQLITE_LIMIT_FUNCTION_ARG, 100),
                (sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH, 1_000),
                (sqlite3.SQLITE_LIMIT_TRIGGER_DEPTH, 10),
                (sqlite3.SQLITE_LIMIT_WORKER_THREADS, 0),
            ):
                con.setlimit(limit, value)
            if setup is not None:
                setup(con)
            if read_only:
                con.execute("PRAGMA query_only = ON")
            else:
                # A database in memory is memory: inserts past the cap fail ("database is full").
                pages = (limits.max_database_mb << 20) // con.execute("PRAGMA page_size").fetchone()[0]
                for schema in ("main", "temp"):
                    con.execute(f"PRAGMA {schema}.max_page_count = {max(pages, 1)}")
            con.set_authorizer(_authorize)
            con.set_progress_handler(self._tick, _TICK)
        except BaseException:
            con.close()
            raise
        self.con = con

    def _tick(self) -> int:
        self._ticks_left -= 1
        self._ticks += 1
        if self._ticks % _MEMORY_EVERY == 0:
            # The baseline is taken only once a statement is long: short ones (all of the
            # mini task's) never pay for reading /proc.
            now = _resident_mb()
            if self._ticks == _MEMORY_EVERY:
                self._memory_base = now
            elif now - self._memory_base > self.limits.max_memory_mb:
                self._stop = f"interrupted: used more than {self.limits.max_memory_mb} MB of memory"
                return 1
        if self._ticks_left < 0:
            self._stop = f"interrupted: more than {self.limits.max_steps} steps of work"
            return 1
        if time.monotonic() > self._deadline:
            self._stop = f"interrupted: ran past its {self.limits.seconds:g}s time limit"
            return 1
        return 0

    def run(self, sql: str, params: tuple[Any, ...] = (), *, limits: SQLLimits | None = None) -> QueryResult:
        """Run one statement; never raises for bad SQL (the error is in the result)."""
        lim = limits or self.limits
        why = refusal(sql, lim)
        if why is not None:
            return QueryResult(None, [], False, why)
        if _first_word(sql) == "vacuum":
            return QueryResult(None, [], False, "statement refused: VACUUM is not allowed")
        saved, self.limits = self.limits, lim
        self._stop = None
        self._ticks_left = lim.max_steps // _TICK
        self._ticks = 0
        self._deadline = time.monotonic() + lim.seconds
        cur = None
        try:
            cur = self.con.execute(sql, params)
            return fetch_capped(cur, lim)
        except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError) as e:
            return QueryResult(None, [], False, self._stop or str(e))
        finally:
            if cur is not None:
                cur.close()  # resets an unfinished statement
            if self._ticks >= _MEMORY_EVERY:
                _give_back_memory()
            self.limits = saved

    def close(self) -> None:
        """Drop the database."""
        self.con.close()

    def __enter__(self) -> "SQLiteSandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
