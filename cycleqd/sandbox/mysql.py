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
  server rather than read;
- disk: after every statement the sample's tablespaces are measured on the
  server (``information_schema.INNODB_SYS_TABLESPACES``); past
  ``SQLLimits.max_database_mb`` the sample's tables are dropped at once, its
  connection is closed and every later statement is refused; ``DATA DIRECTORY``
  and ``INDEX DIRECTORY`` are refused in the text (the server-level guarantee is
  ``--skip-symbolic-links``, see below);
- load: the user has ``MAX_USER_CONNECTIONS 2``, ``MAX_QUERIES_PER_HOUR`` and,
  on MariaDB, ``MAX_STATEMENT_TIME``.

What the *server* lets a user do to the machine is decided by how it runs.
:class:`cycleqd.sandbox.mariadb.MariaDBServer` is the server cycleqd starts
itself (``backend: mysql`` without ``url``). A server given by URL must be
configured the same way; :func:`server_warnings` checks at start-up what can be
seen over SQL and returns one line per gap. Such a server needs, in the
``[mysqld]`` section of its option file::

    user                         = mysql          # never root
    skip-symbolic-links                           # DATA / INDEX DIRECTORY ignored
    secure-file-priv             = /nonexistent   # or an empty folder the server cannot write
    local-infile                 = 0
    bind-address                 = 127.0.0.1      # or skip-networking and a unix socket
    tmpdir                       = /var/lib/mysql-tmp   # private, not /tmp or /dev/shm
    enforce-storage-engine       = InnoDB         # no MEMORY / MyISAM / CSV tables
    max-heap-table-size          = 16M
    maximum-max-heap-table-size  = 16M
    tmp-table-size               = 16M
    maximum-tmp-table-size       = 16M
    tmp-disk-table-size          = 256M
    maximum-tmp-disk-table-size  = 256M
    max-session-mem-used         = 256M
    maximum-max-session-mem-used = 256M
    innodb-temp-data-file-path   = ibtmp1:12M:autoextend:max:512M

and no anonymous users, no grants on ``test`` / ``test\\_%``, and an
administrative account for cycleqd alone (it needs CREATE USER, GRANT OPTION,
PROCESS and the rights it grants; not FILE, not SUPER).
"""
from __future__ import annotations

import secrets
import threading
import time
from typing import Any, Sequence

from cycleqd.sandbox.sqlite import DEFAULT_LIMITS, QueryResult, SQLLimits, fetch_capped, refusal

# Everything a DBBench answer needs inside its own database, nothing about the server.
RIGHTS = ("SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, INDEX, ALTER, CREATE TEMPORARY TABLES, "
           "CREATE VIEW, SHOW VIEW, LOCK TABLES, TRIGGER, REFERENCES")


def quote_name(name: str) -> str:
    """``name`` as a MySQL identifier (backquoted, backquotes doubled)."""
    return "`" + name.replace("`", "``") + "`"


_q = quote_name


def drop_and_close(admin: Any, user: str | None, databases: Sequence[str]) -> None:
    """Drop ``user`` (None: not made) and ``databases`` over the administrative connection ``admin``,
    then close it. Nothing raises: the server may be gone, and one failed drop keeps none of the rest."""
    try:
        with admin.cursor() as cur:
            if user is not None:
                cur.execute("DROP USER IF EXISTS %s@'%%'", (user,))
            for name in databases:
                try:
                    cur.execute(f"DROP DATABASE IF EXISTS {quote_name(name)}")
                except Exception:
                    pass
    except Exception:
        pass
    finally:
        try:
            admin.close()
        except Exception:
            pass


# Per-user resource limits (the harness's SET SESSION before each statement counts too).
MAX_QUERIES_PER_HOUR = 5000


def table_directory_clause(sql: str) -> str | None:
    """``DATA DIRECTORY`` / ``INDEX DIRECTORY`` when the statement's code (outside strings and
    plain comments; inside MariaDB's executable ``/*! ... */`` comments) names one, else None.

    Text screening only: statements built at run time (``PREPARE``, ``EXECUTE IMMEDIATE``)
    are not seen here; the server must ignore the clause itself (``--skip-symbolic-links``).
    """
    last = ""  # the previous word (or "?" for any other token)
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            j = i + 1
            while j < n and sql[j] != c:
                j += 2 if sql[j] == "\\" else 1
            i, last = j + 1, "?"
            continue
        if sql.startswith("/*", i):
            k = i + 2
            if sql.startswith("M!", k) or sql.startswith("!", k):
                k += 2 if sql[k] == "M" else 1
                while k < n and sql[k].isdigit():
                    k += 1
                i = k  # executable comment: its content is code
            else:
                j = sql.find("*/", k)
                i = n if j < 0 else j + 2
            continue
        if sql.startswith("*/", i):
            i += 2
            continue
        if sql.startswith("--", i) or c == "#":
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if c.isalnum() or c == "_":
            j = i
            while j < n and (sql[j].isalnum() or sql[j] in "_$"):
                j += 1
            word = sql[i:j].upper()
            if word == "DIRECTORY" and last in ("DATA", "INDEX"):
                return f"{last} DIRECTORY"
            last, i = word, j
            continue
        if not c.isspace():
            last = "?"
        i += 1
    return None


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
        # max_database_mb bounds the sample's tablespaces on disk (see the module docstring).
        import pymysql

        self.pymysql = pymysql
        self.limits = limits
        self.session = dict(session or {})
        self.name = f"cq_{secrets.token_hex(8)}"  # database and user share the name
        self.admin = None
        self.con = None
        self._user_made = False
        self._full: str | None = None  # why every later statement is refused (the sample is over its cap)
        password = secrets.token_urlsafe(24)
        common = dict(autocommit=True, charset="utf8mb4", connect_timeout=connect_timeout, local_infile=False)
        try:
            self.admin = pymysql.connect(**connect, **common)
            with self.admin.cursor() as cur:
                cur.execute("SELECT VERSION()")
                self.mariadb = "mariadb" in str(cur.fetchone()[0]).lower()
                cur.execute(f"CREATE DATABASE {_q(self.name)} CHARACTER SET utf8mb4")
                resources = f"MAX_USER_CONNECTIONS 2 MAX_QUERIES_PER_HOUR {MAX_QUERIES_PER_HOUR}"
                if self.mariadb:  # the user's default; the watchdog below holds even if it is changed
                    resources += f" MAX_STATEMENT_TIME {float(limits.seconds):g}"
                cur.execute(f"CREATE USER %s@'%%' IDENTIFIED BY %s WITH {resources}", (self.name, password))
                self._user_made = True
                cur.execute(f"GRANT {RIGHTS} ON {_q(self.name)}.* TO %s@'%%'", (self.name,))
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

    def _kill(self, *, connection: bool = False) -> None:
        try:
            with self.admin.cursor() as cur:
                cur.execute(f"KILL {'CONNECTION' if connection else 'QUERY'} {int(self.thread_id)}")
        except Exception:  # the statement may have ended meanwhile
            pass

    def run(self, sql: str, *, limits: SQLLimits | None = None) -> QueryResult:
        """Run one statement as the sample's user; never raises for bad SQL.

        Raises:
            ConnectionError: the connection to the server is gone.
        """
        lim = limits or self.limits
        if self._full is not None:
            return QueryResult(None, [], False, self._full)
        why = refusal(sql, lim)
        if why is None and isinstance(sql, str) and (clause := table_directory_clause(sql)):
            why = f"statement refused: {clause} is not allowed"
        if why is not None:
            return QueryResult(None, [], False, why)
        try:
            return self._run(sql, lim)
        finally:
            self._enforce_disk_cap(lim)

    def _run(self, sql: str, lim: SQLLimits) -> QueryResult:
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

    def database_bytes(self) -> int:
        """Bytes the sample's tables take on the server's disk (their InnoDB tablespaces)."""
        with self.admin.cursor() as cur:
            cur.execute("SELECT COALESCE(SUM(GREATEST(file_size, allocated_size)), 0) "
                        "FROM information_schema.INNODB_SYS_TABLESPACES WHERE LEFT(name, %s) = %s",
                        (len(self.name) + 1, self.name + "/"))
            return int(cur.fetchone()[0])

    def _enforce_disk_cap(self, lim: SQLLimits) -> None:
        """Past the cap: drop the sample's tables now (their files go), end its session, refuse the rest."""
        if self._full is not None or self.admin is None or not self.mariadb:
            return
        try:
            used = self.database_bytes()
        except self.pymysql.MySQLError:
            return  # PROCESS missing on a user's server: server_warnings() says so
        if used <= lim.max_database_mb << 20:
            return
        self._full = (f"statement refused: the database grew past its {lim.max_database_mb} MB cap "
                      "(its tables were dropped)")
        self._kill(connection=True)
        try:
            self.con.close()
        except Exception:
            pass
        self._drop_tables()

    def _drop_tables(self) -> None:
        with self.admin.cursor() as cur:
            cur.execute("SELECT table_name, table_type FROM information_schema.TABLES WHERE table_schema = %s",
                        (self.name,))
            for table, kind in cur.fetchall():
                what = "VIEW" if "VIEW" in str(kind).upper() else "TABLE"
                try:
                    cur.execute(f"DROP {what} IF EXISTS {_q(self.name)}.{_q(table)}")
                except self.pymysql.MySQLError:
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
            drop_and_close(self.admin, self.name if self._user_made else None, [self.name])
            self.admin = None

    def __enter__(self) -> "MySQLSandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def server_warnings(connect: dict[str, Any], *, heap_table_mb: int = 64, session_mem_mb: int = 1024,
                    connect_timeout: float = 10.0) -> list[str]:
    """What a user-given server lacks of the hostile-tenant set-up (module docstring), one line each.

    Checks what can be seen over SQL with the URL's account: symbolic links (``DATA
    DIRECTORY``), ``secure_file_priv``, ``local_infile``, the temporary folder, the network,
    whether ``SET SESSION`` can raise ``max_heap_table_size`` / ``tmp_table_size`` /
    ``max_session_mem_used`` past ``heap_table_mb`` / ``session_mem_mb`` (no ``--maximum-...``),
    ``enforce_storage_engine``, a cap on the temporary tablespace, anonymous accounts,
    grants on ``test`` databases, and the account's own FILE / SUPER / PROCESS rights.
    An empty list: nothing seen to warn about (what runs the server, e.g. root, cannot be seen).

    Raises:
        ConnectionError: the server cannot be reached.
    """
    import pymysql

    try:
        con = pymysql.connect(**connect, autocommit=True, connect_timeout=connect_timeout)
    except pymysql.MySQLError as e:
        raise ConnectionError(f"cannot reach the MySQL server: {_error_text(e)}") from None
    out: list[str] = []

    def one(sql: str, args: Any = None) -> Any:
        try:
            with con.cursor() as cur:
                cur.execute(sql, args)
                row = cur.fetchone()
                return None if row is None else (row[0] if len(row) == 1 else row)
        except pymysql.MySQLError:
            return None

    try:
        version = str(one("SELECT VERSION()") or "")
        mariadb = "mariadb" in version.lower()
        if str(one("SELECT @@have_symlink")).upper() != "DISABLED":
            out.append("symbolic links are enabled: CREATE TABLE ... DATA DIRECTORY / INDEX DIRECTORY can put "
                       "files anywhere the server can write (start it with --skip-symbolic-links)")
        priv = one("SELECT @@secure_file_priv")
        if priv is not None and str(priv).strip() in ("", "/"):
            out.append("secure_file_priv is empty: an account with FILE can read and write any file the server can "
                       "(set it to an empty folder the server cannot write)")
        if one("SELECT @@local_infile") in (1, "1", "ON"):
            out.append("local_infile is ON (cycleqd's client refuses it; set local-infile=0)")
        tmpdir = str(one("SELECT @@tmpdir") or "")
        shared = ("/tmp", "/var/tmp", "/dev/shm", "/run/shm", "/run/lock", "/run")
        if any(p.rstrip("/") in shared for p in tmpdir.split(":")):
            out.append(f"tmpdir is {tmpdir}: sort files and on-disk temporary tables go to a shared host folder "
                       "(use a private folder of the server's own)")
        if one("SELECT @@skip_networking") in (0, "0", "OFF"):
            bind = str(one("SELECT @@bind_address") or "")
            if bind not in ("127.0.0.1", "::1", "localhost"):
                out.append(f"the server listens on {bind or 'every address'}: bind 127.0.0.1 or use a unix socket")
        caps = {"max_heap_table_size": heap_table_mb, "tmp_table_size": heap_table_mb}
        if mariadb:
            caps["max_session_mem_used"] = session_mem_mb
        for var, cap_mb in caps.items():
            old = one(f"SELECT @@session.{var}")
            one(f"SET SESSION {var} = %s", (1 << 40,))
            got = one(f"SELECT @@session.{var}")
            if old is not None:
                one(f"SET SESSION {var} = %s", (old,))
            if got is not None and int(got) > cap_mb << 20:
                out.append(f"SET SESSION {var} can raise it to {int(got) >> 20} MB: start the server with "
                           f"--maximum-{var.replace('_', '-')}")
        if mariadb:
            engine = one("SELECT @@global.enforce_storage_engine")
            if not engine or str(engine).upper() in ("MEMORY", "HEAP"):
                out.append("enforce_storage_engine is not set: samples can create MEMORY tables (server memory) and "
                           "MyISAM / CSV / ARCHIVE tables (set enforce-storage-engine=InnoDB)")
        temp = str(one("SELECT @@innodb_temp_data_file_path") or "")
        if temp and ":max:" not in temp:
            out.append(f"innodb_temp_data_file_path is {temp}: temporary tables can fill the disk (add :max:512M)")
        anon = one("SELECT COUNT(*) FROM mysql.user WHERE user = ''")
        if anon:
            out.append(f"{anon} anonymous account(s): anyone who reaches the server can log in (drop them)")
        tests = one("SELECT GROUP_CONCAT(DISTINCT CONCAT(db, ' to ', IF(user = '', 'anonymous', user))) "
                    "FROM mysql.db WHERE db LIKE 'test%%' OR user = ''", ())
        if tests:
            out.append(f"database grants shared by every sample or anyone: {tests} (drop them: samples could "
                       "read each other's rows there)")
        grants = ""
        try:
            with con.cursor() as cur:
                cur.execute("SHOW GRANTS")
                grants = " ".join(str(r[0]) for r in cur.fetchall()).upper()
        except pymysql.MySQLError:
            pass
        on_all = [g for g in grants.split("GRANT ")[1:] if " ON *.* " in f" {g} "]
        everything = any("ALL PRIVILEGES" in g for g in on_all)
        for right, why in (("FILE", "it can read and write the server's files"),
                           ("SUPER", "it can change global settings")):
            if everything or any(right in g.split(" ON ")[0] for g in on_all):
                out.append(f"the URL's account has {right}: {why}; give cycleqd an account without it "
                           "(it needs CREATE USER, GRANT OPTION, PROCESS and the rights it grants)")
        if grants and not everything and not any("PROCESS" in g.split(" ON ")[0] for g in on_all):
            out.append("the URL's account lacks PROCESS: a sample's disk use cannot be measured or capped")
    finally:
        con.close()
    return out
