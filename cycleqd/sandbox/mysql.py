"""Model-written SQL on a MySQL / MariaDB server, contained.

The harness connects with the URL's (administrative) account only to set up and
tear down; model SQL runs on a second connection as a throw-away user:

- rights: a fresh database and a fresh user (random name and password) per
  sample, with rights on that database only: no FILE (no ``LOAD_FILE``, ``INTO
  OUTFILE``, ``LOAD DATA``), no SUPER, no GRANT, no PROCESS, no routines; the
  client refuses ``LOAD DATA LOCAL``; both are dropped afterwards;
- time: the server's statement timeout (``max_statement_time`` on MariaDB,
  ``max_execution_time`` on MySQL) is set again before every statement, and a
  watchdog on the administrative connection kills any statement still running
  past the limit (the user can change its own session variables; it cannot stop
  the watchdog);
- memory: results are streamed and cut at the row and byte caps of
  :class:`cycleqd.sandbox.sqlite.SQLLimits`; an unread remainder is killed on the
  server rather than read.
"""
from __future__ import annotations

import secrets
import threading
import time
from typing import Any, Sequence

from cycleqd.sandbox.sqlite import DEFAULT_LIMITS, QueryResult, SQLLimits, fetch_capped, refusal

# Everything a DBBench answer needs inside its own database, nothing about the server.
_RIGHTS = ("SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, INDEX, ALTER, CREATE TEMPORARY TABLES, "
           "CREATE VIEW, SHOW VIEW, LOCK TABLES, TRIGGER, REFERENCES")


def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _error_text(e: BaseException) -> str:
    args = getattr(e, "args", ())
    return f"{args[0]}: {args[1]}" if len(args) >= 2 else str(e)


class MySQLSandbox:
    """A throw-away database and user on a MySQL / MariaDB server for one sample's SQL.

    Args:
        connect: ``pymysql.connect`` keyword arguments of the administrative account
            (it must be able to create databases and users and to KILL queries).
        limits: per-statement limits (seconds, row and byte caps).
        session: extra ``SET SESSION`` variables for the user's connection
            (e.g. ``group_concat_max_len``), set again before every statement.

    Raises:
        ConnectionError: the server cannot be reached or refuses to set up the sample.
    """

    def __init__(self, connect: dict[str, Any], limits: SQLLimits = DEFAULT_LIMITS, *,
                 session: dict[str, Any] | None = None, connect_timeout: float = 10.0):
        import pymysql

        self.pymysql = pymysql
        self.limits = limits
        self.session = dict(session or {})
        self.name = f"cq_{secrets.token_hex(8)}"  # database and user share the name
        self.admin = None
        self.con = None
        self._user_made = False
        password = secrets.token_urlsafe(24)
        common = dict(autocommit=True, charset="utf8mb4", connect_timeout=connect_timeout, local_infile=False)
        try:
            self.admin = pymysql.connect(**connect, **common)
            with self.admin.cursor() as cur:
                cur.execute("SELECT VERSION()")
                self.mariadb = "mariadb" in str(cur.fetchone()[0]).lower()
                cur.execute(f"CREATE DATABASE {_q(self.name)} CHARACTER SET utf8mb4")
                cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s WITH MAX_USER_CONNECTIONS 2",
                            (self.name, password))
                self._user_made = True
                cur.execute(f"GRANT {_RIGHTS} ON {_q(self.name)}.* TO %s@'%%'", (self.name,))
            user_kw = {k: v for k, v in connect.items() if k in ("host", "port", "unix_socket")}
            self.con = pymysql.connect(**user_kw, user=self.name, password=password, database=self.name,
                                       cursorclass=pymysql.cursors.SSCursor, **common)
            self.thread_id = self.con.thread_id()
        except BaseException as e:
            self.close()
            if isinstance(e, pymysql.MySQLError):
                raise ConnectionError(f"cannot set up a sandboxed database: {_error_text(e)}") from None
            raise

    # -- trusted side ----------------------------------------------------------------------
    def setup(self, statements: Sequence[tuple[str, Sequence[Any] | None]]) -> None:
        """Run trusted set-up statements (``(sql, params)``; ``params`` may be a list of rows
        for ``executemany``) in the sample's database as the administrative account."""
        with self.admin.cursor() as cur:
            cur.execute(f"USE {_q(self.name)}")
            for sql, params in statements:
                if params and isinstance(params[0], (list, tuple)):
                    cur.executemany(sql, params)
                else:
                    cur.execute(sql, params or None)

    # -- untrusted side --------------------------------------------------------------------
    def _set_session(self, cur: Any, seconds: float) -> None:
        timeout = (("max_statement_time", seconds) if self.mariadb
                   else ("max_execution_time", int(seconds * 1000)))
        values = {**self.session, timeout[0]: timeout[1]}
        cur.execute("SET SESSION " + ", ".join(f"{k} = %s" for k in values), tuple(values.values()))

    def _kill(self) -> None:
        try:
            with self.admin.cursor() as cur:
                cur.execute(f"KILL QUERY {int(self.thread_id)}")
        except Exception:  # the statement may have ended meanwhile
            pass

    def run(self, sql: str, *, limits: SQLLimits | None = None) -> QueryResult:
        """Run one statement as the sample's user; never raises for bad SQL.

        Raises:
            ConnectionError: the connection to the server is gone.
        """
        lim = limits or self.limits
        why = refusal(sql, lim)
        if why is not None:
            return QueryResult(None, [], False, why)
        killed = threading.Event()
        lock = threading.Lock()

        def watchdog() -> None:
            with lock:
                if not done:
                    killed.set()
                    self._kill()

        done = False
        timer = threading.Timer(lim.seconds + 0.5, watchdog)
        cur = self.con.cursor()
        late = f"interrupted: ran past its {lim.seconds:g}s time limit"
        try:
            self._set_session(cur, lim.seconds)
            timer.start()
            start = time.monotonic()
            cur.execute(sql)
            # Some statements (BENCHMARK, SLEEP) end "successfully" when interrupted.
            if killed.is_set() or time.monotonic() - start > lim.seconds:
                return QueryResult(None, [], False, late)
            result = fetch_capped(cur, lim)
            if result.truncated:
                self._kill()  # stop the server instead of reading the rest off the wire
            return result
        except self.pymysql.MySQLError as e:
            if isinstance(e, (self.pymysql.err.OperationalError, self.pymysql.err.InterfaceError)) \
                    and not self.con.open:
                raise ConnectionError(f"lost the sandboxed database connection: {_error_text(e)}") from None
            if killed.is_set():
                return QueryResult(None, [], False, late)
            return QueryResult(None, [], False, _error_text(e))
        finally:
            with lock:
                done = True
            timer.cancel()
            try:
                cur.close()  # drains what is left of a killed result
            except Exception:
                pass

    def close(self) -> None:
        """Drop the user and the database, close both connections."""
        if self.con is not None:
            try:
                self.con.close()
            except Exception:
                pass
            self.con = None
        if self.admin is not None:
            try:
                with self.admin.cursor() as cur:
                    if self._user_made:
                        cur.execute("DROP USER IF EXISTS %s@'%%'", (self.name,))
                    cur.execute(f"DROP DATABASE IF EXISTS {_q(self.name)}")
            except Exception:
                pass
            finally:
                try:
                    self.admin.close()
                except Exception:
                    pass
                self.admin = None

    def __enter__(self) -> "MySQLSandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
