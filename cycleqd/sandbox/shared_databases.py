"""DBBench's databases as the official harness keeps them: one server, one database per table name.

fishfarm's ``DBBenchTask.evaluate`` starts one MySQL container per evaluation and, before
the first reply, runs every selected row's set-up SQL in it (``build_sql``)::

    CREATE DATABASE IF NOT EXISTS `name`; USE `name`;
    CREATE TABLE IF NOT EXISTS `name` (`col` TEXT, ...);
    INSERT INTO `name` (`col`, ...) VALUES ('v', ...), ...; COMMIT;

as one multi-statement call, so the statements run until the first fails. Rows that share a
table name share that database: the same columns merge both rows' data into one table,
other columns make the second ``INSERT`` fail (its rows are not added), and duplicate
column names make ``CREATE TABLE`` fail (no table). Each statement the model writes runs
in the row's database (``USE `name```) on a fresh connection, and its observation is what
:mod:`cycleqd.sandbox.connector` describes. When a row finishes, the harness hashes its
table (mutating rows) and runs ``drop database `name```, whatever other rows still use it.

Two implementations behind :class:`SharedDatabases`:

- :class:`MariaDBShared`: real databases named exactly after the tables on a MariaDB /
  MySQL server (cycleqd's own :class:`~cycleqd.sandbox.mariadb.MariaDBServer`, or one at a
  URL that no other evaluation uses at the same time). Set-up and drops run as the
  administrative account; model SQL runs as one throw-away user with rights on these
  databases only, under the statement time limit, a watchdog, capped results and a disk cap
  (as :class:`~cycleqd.sandbox.mysql.MySQLSandbox`).
- :class:`SQLiteShared`: the same in process, one :class:`~cycleqd.sandbox.sqlite.SQLiteSandbox`
  per database name, with the connector's strings (values, ``[]``, MariaDB's error texts for
  unknown columns, tables and databases and for syntax errors, the multi-statement reply).
"""
from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
import time
import unicodedata
from decimal import Decimal
from typing import Any, Protocol, Sequence

from cycleqd.sandbox import connector
from cycleqd.sandbox.mysql import RIGHTS, drop_and_close
from cycleqd.sandbox.mysql import quote_name as _q
from cycleqd.sandbox.sqlite import QueryResult, SQLiteSandbox, SQLLimits, fetch_capped, refusal

SQL_LIMITS = SQLLimits()
HASH_LIMITS = SQLLimits(seconds=30.0, max_rows=200_000, max_bytes=64 << 20)
SETUP_LIMITS = SQLLimits(seconds=60.0, max_sql_chars=10_000_000, max_value_bytes=1 << 24)
GROUP_CONCAT_MAX_LEN = 1024  # MySQL 8's default, which the recorded hashes depend on


def _escape(text: Any) -> str:
    """fishfarm's ``escape``: ``str()`` of the value, then ``mysql_real_escape_string``."""
    out = []
    for ch in str(text):
        out.append({"\0": "\\0", "\n": "\\n", "\r": "\\r", "\\": "\\\\", "'": "\\'", '"': '\\"',
                    "\x1a": "\\Z"}.get(ch, ch))
    return "".join(out)


def build_sql(name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """fishfarm's ``build_sql`` text for one row's table (run as one multi-statement call)."""
    cols = ",".join(f"`{_escape(c)}` TEXT" for c in columns)
    names = ",".join(f"`{_escape(c)}`" for c in columns)
    items = ",".join("(" + ",".join(f"'{_escape(v)}'" for v in r) + ")" for r in rows)
    return (f"CREATE DATABASE IF NOT EXISTS `{name}`;\n    USE `{name}`;\n"
            f"    CREATE TABLE IF NOT EXISTS `{name}` ({cols});\n"
            f"    INSERT INTO `{name}` ({names}) VALUES {items};\n    COMMIT;\n    ")


def hash_query(name: str, columns: Sequence[str]) -> str:
    """fishfarm's table-hash query for a mutating row (run in the row's database)."""
    cols = ",".join(f"`{_escape(c)}`" for c in columns)
    return (f"SELECT MD5(GROUP_CONCAT(rowhash ORDER BY rowhash)) AS hash "
            f"FROM (    SELECT SUBSTRING(MD5(CONCAT_WS(',', {cols})), 1, 5) AS rowhash "
            f"    FROM `{name}`) AS sub;")


class SharedDatabases(Protocol):
    """One evaluation's databases, named after the tables (see module docstring)."""

    def create(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        ...

    def execute(self, sql: str, database: str, *, limits: SQLLimits | None = None) -> str:
        ...

    def drop(self, name: str) -> None:
        ...

    def close(self) -> None:
        ...


# ---------------------------------------------------------------------------------------------
# MariaDB / MySQL
# ---------------------------------------------------------------------------------------------
def _pymysql_with_sqlstate() -> Any:
    """A pymysql Connection class whose errors carry the server's SQLSTATE (``e.sqlstate``)."""
    import pymysql
    from pymysql import connections

    class StatePacket(connections.MysqlPacket):
        def raise_for_error(self) -> None:
            try:
                super().raise_for_error()
            except pymysql.MySQLError as e:
                data = self._data
                e.sqlstate = data[4:9].decode("ascii", "replace") if data[3:4] == b"#" else None
                raise

    packets: dict[type, type] = {connections.MysqlPacket: StatePacket}

    class StateConnection(connections.Connection):
        def _read_packet(self, packet_type: type = connections.MysqlPacket) -> Any:
            if packet_type not in packets:
                packets[packet_type] = type("State" + packet_type.__name__, (packet_type,),
                                            {"raise_for_error": StatePacket.raise_for_error})
            return super()._read_packet(packets[packet_type])

    return StateConnection


def _server_error(e: BaseException) -> str:
    args = getattr(e, "args", ())
    if len(args) >= 2 and isinstance(args[0], int):
        return connector.error_text(args[0], getattr(e, "sqlstate", None), str(args[1]))
    return str(e)


class MariaDBShared:
    """The evaluation's databases on a MariaDB / MySQL server (see module docstring).

    Args:
        connect: ``pymysql.connect`` keyword arguments of the administrative account.
        limits: per-statement limits of model SQL.

    Raises:
        ConnectionError: the server cannot be reached or refuses to set up the user.
    """

    def __init__(self, connect: dict[str, Any], limits: SQLLimits = SQL_LIMITS, *, connect_timeout: float = 10.0):
        import pymysql

        self.pymysql = pymysql
        self.Connection = _pymysql_with_sqlstate()
        self.limits = limits
        self.names: list[str] = []
        self.user = f"cq_{secrets.token_hex(8)}"
        self._password = secrets.token_urlsafe(24)
        self._user_made = False
        self._full: str | None = None
        self._common = dict(charset="utf8mb4", connect_timeout=connect_timeout, local_infile=False, ssl_disabled=True)
        self._admin_kw = dict(connect)
        self._user_kw = {k: v for k, v in connect.items() if k in ("host", "port", "unix_socket")}
        self.admin = None
        try:
            self.admin = pymysql.connect(**connect, autocommit=True, **self._common)
            with self.admin.cursor() as cur:
                cur.execute("SELECT VERSION()")
                self.mariadb = "mariadb" in str(cur.fetchone()[0]).lower()
                resources = "MAX_USER_CONNECTIONS 2 MAX_QUERIES_PER_HOUR 200000"
                if self.mariadb:
                    resources += f" MAX_STATEMENT_TIME {float(limits.seconds):g}"
                cur.execute(f"CREATE USER %s@'%%' IDENTIFIED BY %s WITH {resources}", (self.user, self._password))
                self._user_made = True
        except BaseException as e:
            self.close()
            if isinstance(e, pymysql.MySQLError):
                raise ConnectionError(f"cannot set up the DBBench databases: {_server_error(e)}") from None
            raise

    # -- the connector's view of one call ------------------------------------------------------
    def _connect(self, admin: bool) -> Any:
        kw = self._admin_kw if admin else dict(self._user_kw, user=self.user, password=self._password)
        return self.Connection(**kw, autocommit=False, cursorclass=self.pymysql.cursors.SSCursor,
                               client_flag=self.pymysql.constants.CLIENT.MULTI_STATEMENTS, **self._common)

    def _kill(self, thread_id: int) -> None:
        try:
            with self.admin.cursor() as cur:
                cur.execute(f"KILL {int(thread_id)}")
        except Exception:
            pass

    def _call(self, sql: str, database: str | None, lim: SQLLimits, *, admin: bool = False) -> str:
        """fishfarm's ``Container.execute(sql, database)`` on a fresh connection (its ``reconnect``)."""
        pymysql = self.pymysql
        try:
            con = self._connect(admin)
        except pymysql.MySQLError as e:
            return connector.cut(_server_error(e))
        killed = threading.Event()
        timer = threading.Timer(lim.seconds + 0.5, lambda: (killed.set(), self._kill(con.thread_id())))
        late = f"interrupted: ran past its {lim.seconds:g}s time limit"
        cur = None
        try:
            cur = con.cursor()
            timeout = (("max_statement_time", lim.seconds) if self.mariadb
                       else ("max_execution_time", int(lim.seconds * 1000)))
            cur.execute(f"SET SESSION group_concat_max_len = {GROUP_CONCAT_MAX_LEN}, {timeout[0]} = %s",
                        (timeout[1],))
            if database:
                cur.execute(f"use `{database}`;")
            timer.start()
            start = time.monotonic()
            several = False
            try:
                cur.execute(sql)
                if killed.is_set() or time.monotonic() - start > lim.seconds:
                    return late
                first = fetch_capped(cur, lim)
                if first.truncated:  # far past the 800 characters shown
                    self._kill(con.thread_id())
                    return connector.rows_text(first.rows)
                several = bool(getattr(cur._result, "has_next", False))
                if several:  # the server runs the rest; the connector's commit then fails
                    while cur.nextset():
                        if fetch_capped(cur, lim).truncated:
                            self._kill(con.thread_id())
                            break
                    return connector.OUT_OF_SYNC
                con.commit()
                return connector.rows_text(first.rows)
            except pymysql.MySQLError as e:
                if several:
                    return connector.OUT_OF_SYNC
                if killed.is_set():
                    return late
                return connector.cut(_server_error(e))
        except pymysql.MySQLError as e:
            return connector.cut(_server_error(e))
        finally:
            timer.cancel()
            try:
                con.close()  # what was not committed is rolled back, as on the connector's reconnect
            except Exception:
                pass
            if cur is not None:  # rows left unread (a capped or killed result) went with the connection
                if cur._result is not None:
                    cur._result.unbuffered_active = False
                cur.connection = None

    # -- the harness ---------------------------------------------------------------------------
    def create(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Run fishfarm's set-up SQL for one row (errors are ignored there too) and let the user in."""
        self._call(build_sql(name, columns, rows), None, SETUP_LIMITS, admin=True)
        if name not in self.names:
            self.names.append(name)
            pattern = name.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%")
            try:
                with self.admin.cursor() as cur:
                    cur.execute(f"GRANT {RIGHTS} ON {_q(pattern)}.* TO %s@'%%'", (self.user,))
            except self.pymysql.MySQLError:
                pass  # a name the server refuses: every statement in it fails, as officially

    def execute(self, sql: str, database: str, *, limits: SQLLimits | None = None) -> str:
        """One statement (or reply) of the model in ``database``, as the official client shows it."""
        lim = limits or self.limits
        if self._full is not None:
            return self._full
        why = refusal(sql, lim)
        if why is None:
            from cycleqd.sandbox.mysql import table_directory_clause

            clause = table_directory_clause(sql)
            why = f"statement refused: {clause} is not allowed" if clause else None
        if why is not None:
            return why
        try:
            return self._call(sql, database, lim)
        finally:
            self._enforce_disk_cap()

    def table_hash(self, name: str, columns: Sequence[str]) -> str:
        """What fishfarm's hash query shows for the row's table (:func:`hash_query`)."""
        return self.execute(hash_query(name, columns), name, limits=HASH_LIMITS)

    def drop(self, name: str) -> None:
        """``drop database `name``` as the harness runs it when a row finishes."""
        self._call(f"drop database `{name}`", None, SETUP_LIMITS, admin=True)

    def database_bytes(self) -> int:
        """Bytes the evaluation's tables take on the server's disk."""
        if not self.names:
            return 0
        marks = ", ".join(["%s"] * len(self.names))
        with self.admin.cursor() as cur:
            cur.execute("SELECT COALESCE(SUM(GREATEST(file_size, allocated_size)), 0) FROM "
                        f"information_schema.INNODB_SYS_TABLESPACES WHERE SUBSTRING_INDEX(name, '/', 1) IN ({marks})",
                        tuple(self._file_name(n) for n in self.names))
            return int(cur.fetchone()[0])

    @staticmethod
    def _file_name(name: str) -> str:
        """The server's file-system name of a database (``@002d`` for ``-`` and so on)."""
        return "".join(c if c.isascii() and (c.isalnum() or c == "_") else "@%04x" % ord(c) for c in name)

    def _enforce_disk_cap(self) -> None:
        if self._full is not None or self.admin is None or not self.mariadb:
            return
        try:
            used = self.database_bytes()
        except self.pymysql.MySQLError:
            return
        if used <= self.limits.max_database_mb << 20:
            return
        self._full = (f"statement refused: the databases grew past their {self.limits.max_database_mb} MB cap "
                      "(they were dropped)")
        for name in self.names:
            self.drop(name)

    def close(self) -> None:
        """Drop every database made here and the user; close the administrative connection."""
        if self.admin is None:
            return
        drop_and_close(self.admin, self.user if self._user_made else None, list(self.names))
        self.admin = None


# ---------------------------------------------------------------------------------------------
# SQLite emulation
# ---------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def mysql_double(v: Any) -> float:
    """A value as MySQL reads it in numeric context: a string's leading number, else 0."""
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
    m = _NUMBER.match(str(v))
    return float(m.group(0)) if m else 0.0


class _Sum:
    """MySQL's SUM: DOUBLE over text, exact DECIMAL over integers."""

    def __init__(self) -> None:
        self.exact: Decimal | None = None
        self.approx: float | None = None
        self.n = 0

    def step(self, v: Any) -> None:
        if v is None:
            return
        self.n += 1
        if isinstance(v, int):
            self.exact = (self.exact or Decimal(0)) + v
        else:
            self.approx = (self.approx or 0.0) + mysql_double(v)

    def total(self) -> Any:
        if self.n == 0:
            return None
        if self.approx is None:
            return str(self.exact)  # SQLite has no DECIMAL: marked, turned back in _sqlite_value
        return self.approx + float(self.exact or 0)

    def finalize(self) -> Any:
        t = self.total()
        return f"\x00dec:{t}" if isinstance(t, str) else t


class _Avg(_Sum):
    """MySQL's AVG: DOUBLE over text, DECIMAL with 4 more decimals over integers."""

    def finalize(self) -> Any:
        t = self.total()
        if isinstance(t, str):
            return f"\x00dec:{(Decimal(t) / self.n).quantize(Decimal('0.0001'))}"
        return None if t is None else t / self.n


def _sqlite_value(v: Any) -> Any:
    if isinstance(v, str) and v.startswith("\x00dec:"):
        return Decimal(v[5:])
    return v


def _ai_ci_key(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c)).casefold()


def mysql_ai_ci(a: str, b: str) -> int:
    """MySQL 8's ``utf8mb4_0900_ai_ci`` in short: accents and case are ignored (``'Montreal' = 'Montréal'``)."""
    ka, kb = _ai_ci_key(a), _ai_ci_key(b)
    return (ka > kb) - (ka < kb)


def _mysql_functions(con: sqlite3.Connection) -> None:
    from cycleqd.sandbox.databases import _mysql_like_sqlite

    _mysql_like_sqlite(con)
    con.create_collation("MYSQL_AI_CI", mysql_ai_ci)
    con.create_aggregate("SUM", 1, _Sum)
    con.create_aggregate("AVG", 1, _Avg)


_CLAUSES = (("ORDER BY", "ORDER BY"), ("GROUP BY", "GROUP BY"), ("HAVING", "HAVING"), ("WHERE", "WHERE"),
            ("SET", "SET"), ("ON", "ON"), ("SELECT", "SELECT"))


def _clause_of(sql: str, column: str) -> str:
    """The clause MariaDB names for an unknown column: the last clause keyword before its first use."""
    m = re.search(r"(?<![\w`])`?" + re.escape(column.split(".")[-1]) + r"`?(?![\w`])", sql, re.IGNORECASE)
    head = sql[: m.start()] if m else sql
    best, where = "SELECT", -1
    for word, name in _CLAUSES:
        for k in re.finditer(r"\b" + word.replace(" ", r"\s+") + r"\b", head, re.IGNORECASE):
            if k.start() > where:
                best, where = name, k.start()
    return best


def mariadb_error(message: str, sql: str, database: str) -> str:
    """An SQLite error as MariaDB words it (through the connector) where the two correspond."""
    m = re.match(r"no such column: (.+)$", message)
    if m:
        col = m.group(1)
        return connector.error_text(1054, "42S22", f"Unknown column '{col}' in '{_clause_of(sql, col)}'")
    m = re.match(r"no such table: (?:main\.)?(.+)$", message)
    if m:
        return connector.error_text(1146, "42S02", f"Table '{database}.{m.group(1)}' doesn't exist")
    m = re.match(r'near "(.*)": syntax error$', message, re.DOTALL)
    if m or message == "incomplete input":
        rest = ""
        if m:
            k = sql.find(m.group(1))
            rest = sql[k:] if k >= 0 else ""
        return connector.error_text(
            1064, "42000", "You have an error in your SQL syntax; check the manual that corresponds to your "
            f"MariaDB server version for the right syntax to use near '{rest[:80]}' at line 1")
    m = re.match(r"table (\S+) already exists$", message)
    if m:
        return connector.error_text(1050, "42S01", f"Table '{m.group(1).strip(chr(34))}' already exists")
    return connector.error_text(1105, "HY000", message)


_DDL = ("create", "drop", "alter", "rename", "truncate")


class SQLiteShared:
    """The evaluation's databases in process: one SQLite sandbox per table name (see module docstring)."""

    def __init__(self, limits: SQLLimits = SQL_LIMITS):
        self.limits = limits
        self.dbs: dict[str, SQLiteSandbox] = {}
        self.columns: dict[str, list[str]] = {}

    def create(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """fishfarm's set-up SQL for one row, statement by statement, stopping at the first failure."""
        box = self.dbs.get(name)
        if box is None:
            box = self.dbs[name] = SQLiteSandbox(self.limits, setup=_mysql_functions)
        if name not in self.columns:
            lowered = [c.lower() for c in columns]
            if len(set(lowered)) != len(lowered):
                return  # 1060 Duplicate column name: no table
            cols = ", ".join(f"{_q(str(c))} TEXT COLLATE MYSQL_AI_CI" for c in columns)
            if box.run(f"CREATE TABLE {_q(name)} ({cols})", limits=SETUP_LIMITS).error is not None:
                return
            self.columns[name] = [str(c) for c in columns]
        have = {c.lower() for c in self.columns[name]}
        if any(str(c).lower() not in have for c in columns) or any(len(r) != len(columns) for r in rows):
            return  # 1054 Unknown column / 1136 Column count doesn't match: no row is added
        if not rows:
            return  # an INSERT without rows is a syntax error
        marks = "(" + ", ".join("?" * len(columns)) + ")"
        head = f"INSERT INTO {_q(name)} ({', '.join(_q(str(c)) for c in columns)}) VALUES "
        box.run("BEGIN", limits=SETUP_LIMITS)
        for r in rows:
            res = box.run(head + marks, tuple(str(v) for v in r), limits=SETUP_LIMITS)
            if res.error is not None:
                box.run("ROLLBACK", limits=SETUP_LIMITS)
                return
        box.run("COMMIT", limits=SETUP_LIMITS)

    def _one(self, box: SQLiteSandbox, stmt: str, database: str, lim: SQLLimits) -> tuple[QueryResult, str]:
        res = box.run(connector.mysql_to_sqlite(stmt), limits=lim)
        if res.error is not None:
            if res.error.startswith(("statement refused", "interrupted")):
                return res, res.error
            return res, connector.cut(mariadb_error(res.error, stmt, database))
        return res, connector.rows_text([tuple(_sqlite_value(v) for v in r) for r in res.rows])

    def execute(self, sql: str, database: str, *, limits: SQLLimits | None = None) -> str:
        """One statement (or reply) of the model in ``database``, as the official client shows it."""
        lim = limits or self.limits
        box = self.dbs.get(database)
        if box is None:
            return connector.error_text(1049, "42000", f"Unknown database '{database}'")
        why = refusal(sql, lim)
        if why is not None:
            return why
        statements = connector.split_statements(sql)
        if not statements:
            return connector.error_text(1065, "42000", "Query was empty")
        if len(statements) == 1:
            word = statements[0].split(None, 1)[0].lower()
            if word in ("commit", "rollback", "begin") or statements[0].lower().startswith("start transaction"):
                return "[]"  # the client commits after every call and reconnects before the next
            _, text = self._one(box, statements[0], database, lim)
            if box.con.in_transaction:
                box.run("COMMIT", limits=lim)  # the client commits after every call
            return text
        # Several: all run until one fails; only what a COMMIT or DDL made permanent stays.
        if box.con.in_transaction:
            box.run("COMMIT", limits=lim)
        box.run("SAVEPOINT cq_reply", limits=lim)
        for stmt in statements:
            word = stmt.split(None, 1)[0].lower() if stmt.split() else ""
            if word == "commit":
                box.run("RELEASE cq_reply", limits=lim)
                box.run("SAVEPOINT cq_reply", limits=lim)
                continue
            res, _ = self._one(box, stmt, database, lim)
            if res.error is not None:
                break
            if word in _DDL:
                box.run("RELEASE cq_reply", limits=lim)
                box.run("SAVEPOINT cq_reply", limits=lim)
        if box.con.in_transaction:
            box.run("ROLLBACK TO cq_reply", limits=lim)
            box.run("RELEASE cq_reply", limits=lim)
        return connector.OUT_OF_SYNC

    def table_rows(self, name: str) -> list[tuple] | None:
        """The rows of the table ``name`` (None when there is none)."""
        box = self.dbs.get(name)
        if box is None or name not in self.columns:
            return None
        res = box.run(f"SELECT * FROM {_q(name)}", limits=HASH_LIMITS)
        return None if res.error is not None else res.rows

    def table_hash(self, name: str, columns: Sequence[str]) -> str:
        """What fishfarm's hash query shows for the row's table (:func:`hash_query`)."""
        box = self.dbs.get(name)
        if box is None:
            return connector.error_text(1049, "42000", f"Unknown database '{name}'")
        cols = ", ".join(_q(str(c)) for c in columns)
        res = box.run(f"SELECT {cols} FROM {_q(name)}", limits=HASH_LIMITS)
        if res.error is not None:
            return connector.cut(mariadb_error(res.error, hash_query(name, columns), name))
        if res.truncated:
            return "table too large to hash"
        if not res.rows:
            return "[(None,)]"
        hashes = sorted(hashlib.md5(",".join(_text(x) for x in r if x is not None).encode()).hexdigest()[:5]
                        for r in res.rows)
        joined = ",".join(hashes).encode()[:GROUP_CONCAT_MAX_LEN]
        return str([(hashlib.md5(joined).hexdigest(),)])

    def drop(self, name: str) -> None:
        """``drop database `name```: the database and its tables are gone for every row."""
        box = self.dbs.pop(name, None)
        self.columns.pop(name, None)
        if box is not None:
            box.close()

    def close(self) -> None:
        """Drop every database."""
        for name in list(self.dbs):
            self.drop(name)


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return str(v)


class SharedDatabase:
    """One row's view of :class:`SharedDatabases`: the :class:`cycleqd.sandbox.databases.Database`
    calls of an episode. ``close`` is the harness's ``drop database`` when the row finishes."""

    def __init__(self, shared: "MariaDBShared | SQLiteShared", name: str, columns: Sequence[str]):
        self.shared, self.name, self.columns = shared, name, [str(c) for c in columns]

    def execute(self, sql: str) -> str:
        return self.shared.execute(sql, self.name)

    def table_hash(self) -> str:
        return self.shared.table_hash(self.name, self.columns)

    def close(self) -> None:
        self.shared.drop(self.name)
