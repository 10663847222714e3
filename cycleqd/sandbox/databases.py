"""A DBBench sample's database: the table made and filled, model SQL run the AgentBench way, the table hashed.

Two adapters behind one :class:`Database` protocol:

- :class:`SQLiteDatabase` (in process, the default): emulates the MySQL behaviour the scoring
  depends on (the table hash with MySQL's 1024-byte ``group_concat`` limit, case-insensitive
  text comparison, MySQL-style result rows, the MySQL functions models use), with model SQL in
  :class:`~cycleqd.sandbox.sqlite.SQLiteSandbox`;
- :class:`MySQLDatabase`: a fresh database and user per sample on a MySQL / MariaDB server,
  with model SQL in :class:`~cycleqd.sandbox.mysql.MySQLSandbox`.
"""
from __future__ import annotations

import hashlib
import sqlite3
from typing import Any, Protocol, Sequence
from urllib.parse import unquote, urlparse

from cycleqd.config import ConfigError
from cycleqd.sandbox.connector import mysql_to_sqlite
from cycleqd.sandbox.mysql import MySQLSandbox
from cycleqd.sandbox.sqlite import QueryResult, SQLiteSandbox, SQLLimits

MAX_RESULT_CHARS = 800
GROUP_CONCAT_MAX_LEN = 1024  # MySQL's default; the recorded hashes depend on it
NO_RESULT = "No result set to fetch from."  # what AgentBench's MySQL client reports for INSERT/UPDATE/DELETE

SQL_LIMITS = SQLLimits()  # per model statement
HASH_LIMITS = SQLLimits(seconds=30.0, max_rows=200_000, max_bytes=64 << 20)  # the harness's table hash


def _cut(text: str) -> str:
    return text[:MAX_RESULT_CHARS] + "[TRUNCATED]" if len(text) > MAX_RESULT_CHARS else text


def _cell(v: Any) -> str | None:
    """A data value as MySQL stores it in a TEXT column (the client sends Python reprs)."""
    if v is None:
        return None
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return repr(v)
    return str(v)


def table_hash(rows: Sequence[Sequence[Any]]) -> str:
    """AgentBench's table hash, as the string of the fetched result row.

    ``str([(md5(group_concat(left(md5(concat_ws(',', cols)), 5) order by 1)),)])``;
    NULLs are skipped by concat_ws, group_concat stops at 1024 bytes, and an empty
    table gives ``[(None,)]``.
    """
    if not rows:
        return str([(None,)])
    hashes = sorted(hashlib.md5(",".join(_text(x) for x in r if x is not None).encode()).hexdigest()[:5]
                    for r in rows)
    joined = ",".join(hashes).encode()[:GROUP_CONCAT_MAX_LEN]
    return str([(hashlib.md5(joined).hexdigest(),)])


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, float) and v.is_integer():
        return repr(v)
    return str(v)


class Database(Protocol):
    """One sample's database: run a statement the AgentBench way, hash the table."""

    def execute(self, sql: str) -> str:
        ...

    def table_hash(self) -> str:
        ...

    def close(self) -> None:
        ...


def _mysql_like_sqlite(con: sqlite3.Connection) -> None:
    """MySQL functions models use that SQLite lacks (or names differently)."""
    def concat(*a: Any) -> str | None:
        return None if any(x is None for x in a) else "".join(_text(x) for x in a)

    def concat_ws(sep: Any, *a: Any) -> str | None:
        return None if sep is None else str(sep).join(_text(x) for x in a if x is not None)

    con.create_function("CONCAT", -1, concat, deterministic=True)
    con.create_function("CONCAT_WS", -1, concat_ws, deterministic=True)
    con.create_function("MD5", 1, lambda s: None if s is None else hashlib.md5(_text(s).encode()).hexdigest(),
                        deterministic=True)
    con.create_function("IF", 3, lambda c, a, b: a if c else b, deterministic=True)
    con.create_function("LEFT", 2, lambda s, n: None if s is None else _text(s)[: max(int(n), 0)], deterministic=True)
    con.create_function("RIGHT", 2, lambda s, n: None if s is None else (_text(s)[-int(n):] if int(n) > 0 else ""),
                        deterministic=True)


class SQLiteDatabase:
    """In-process SQLite table with TEXT columns compared case-insensitively (like MySQL's default collation).

    Model SQL runs in :class:`cycleqd.sandbox.sqlite.SQLiteSandbox` (private in-memory
    database, no files or extensions, time / work / memory limits, capped results).
    """

    def __init__(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]):
        self.table, self.columns = table, list(columns)

        def setup(con: sqlite3.Connection) -> None:
            _mysql_like_sqlite(con)
            cols = ", ".join(f"{_q(c)} TEXT COLLATE NOCASE" for c in self.columns)
            con.execute(f"CREATE TABLE {_q(table)} ({cols})")
            marks = ", ".join("?" * len(self.columns))
            con.executemany(f"INSERT INTO {_q(table)} VALUES ({marks})", [[_cell(v) for v in r] for r in rows])

        self.sandbox = SQLiteSandbox(SQL_LIMITS, setup=setup)

    def execute(self, sql: str) -> str:
        return _render(self.sandbox.run(mysql_to_sqlite(sql) if isinstance(sql, str) else sql))

    def table_hash(self) -> str:
        cols = ", ".join(_q(c) for c in self.columns)
        res = self.sandbox.run(f"SELECT {cols} FROM {_q(self.table)}", limits=HASH_LIMITS)
        if res.error is not None:
            return res.error
        if res.truncated:
            return "table too large to hash"
        return table_hash(res.rows)

    def close(self) -> None:
        self.sandbox.close()


def _render(res: QueryResult) -> str:
    """What AgentBench's client shows the model: the error, a notice, or ``str`` of the rows."""
    if res.error is not None:
        return _cut(res.error)
    if res.columns is None:
        return NO_RESULT
    return _cut(str(res.rows))


def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def parse_mysql_url(url: str) -> dict[str, Any]:
    """``mysql://user:password@host:port/db`` (or ``?unix_socket=/path``) -> pymysql.connect kwargs.

    Raises:
        ConfigError: not a mysql:// URL.
    """
    u = urlparse(url)
    if u.scheme not in ("mysql", "mariadb", "mysql+pymysql"):
        raise ConfigError(f"dbbench url {url!r} must look like mysql://user:password@127.0.0.1:3306/")
    kw: dict[str, Any] = {"host": u.hostname or "127.0.0.1", "port": u.port or 3306,
                          "user": unquote(u.username or "root"), "password": unquote(u.password or "")}
    for part in filter(None, u.query.split("&")):
        k, _, v = part.partition("=")
        if k == "unix_socket":
            kw["unix_socket"] = unquote(v)
    return kw


class MySQLDatabase:
    """The sample's table in a fresh database on a MySQL / MariaDB server (dropped on close).

    Model SQL runs in :class:`cycleqd.sandbox.mysql.MySQLSandbox`: as a throw-away
    user with rights on this database only, under a statement time limit, with
    capped results.
    """

    def __init__(self, url: str, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]):
        try:
            import pymysql
        except ImportError:
            raise ConfigError("dbbench backend 'mysql' needs `pip install pymysql`") from None
        self.pymysql = pymysql
        self.table, self.columns = table, list(columns)
        self.sandbox = MySQLSandbox(parse_mysql_url(url), SQL_LIMITS,
                                    session={"group_concat_max_len": GROUP_CONCAT_MAX_LEN})
        self.init_error: str | None = None
        cols = ", ".join(f"{_q(c)} TEXT" for c in self.columns)
        try:
            self.sandbox.setup([(f"CREATE TABLE {_q(table)} ({cols})", None)])
        except pymysql.MySQLError as e:
            # AgentBench carries on when its set-up SQL fails (the error is only
            # printed); the sample is then played against the empty database.
            self.init_error = str(e)
            return
        if rows:
            marks = "(" + ", ".join(["%s"] * len(self.columns)) + ")"
            self.sandbox.setup([(f"INSERT INTO {_q(table)} ({', '.join(_q(c) for c in self.columns)}) VALUES {marks}",
                                 [[_cell(v) for v in r] for r in rows])])

    def execute(self, sql: str) -> str:
        return _render(self.sandbox.run(sql))

    def table_hash(self) -> str:
        cols = ", ".join(_q(c) for c in self.columns)
        query = (f"SELECT md5(group_concat(rowhash ORDER BY rowhash)) AS hash FROM "
                 f"(SELECT substring(MD5(CONCAT_WS(',', {cols})), 1, 5) AS rowhash FROM {_q(self.table)}) AS sub")
        return _render(self.sandbox.run(query, limits=HASH_LIMITS))

    def close(self) -> None:
        self.sandbox.close()
