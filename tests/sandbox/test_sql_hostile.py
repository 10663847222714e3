"""Hostile model SQL on both backends: every attack ends quickly in an error (or a capped,
harmless answer), creates nothing on the host and leaves the worker's memory alone."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import pytest

from cycleqd.sandbox.sqlite import QueryResult, SQLiteSandbox, SQLLimits

# a capped or killed result is dropped with its connection: nothing is left to fail when collected
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

LIMITS = SQLLimits(seconds=1.0, max_rows=1000, max_bytes=64 << 10)
SLACK = 3.0  # seconds on top of the limit a stopped statement may take on a loaded machine


class Backend:
    """One sandbox per test on either backend, plus what the test needs to look at it."""

    def __init__(self, kind: str, url: str | None = None):
        self.kind, self.url = kind, url
        self.opened: list = []

    def open(self):
        if self.kind == "sqlite":
            def setup(con):
                con.execute("CREATE TABLE t (a TEXT, b INTEGER)")
                con.executemany("INSERT INTO t VALUES (?, ?)", [(str(i), i) for i in range(100)])
            sb = SQLiteSandbox(LIMITS, setup=setup)
        else:
            from cycleqd.sandbox.databases import parse_mysql_url
            from cycleqd.sandbox.mysql import MySQLSandbox

            sb = MySQLSandbox(parse_mysql_url(self.url), LIMITS)
            sb.setup([("CREATE TABLE t (a TEXT, b INTEGER)", None),
                      ("INSERT INTO t VALUES (%s, %s)", [(str(i), i) for i in range(100)])])
        self.opened.append(sb)
        return sb

    def close(self) -> None:
        for sb in self.opened:
            sb.close()


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def backend(request) -> Iterator[Backend]:
    url = request.getfixturevalue("mariadb_url") if request.param == "mariadb" else None
    b = Backend(request.param, url)
    yield b
    b.close()


@pytest.fixture
def server(mariadb_url: str) -> Iterator[Backend]:
    """The MariaDB backend alone, for attacks only a server has."""
    b = Backend("mariadb", mariadb_url)
    yield b
    b.close()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _run(sb, sql: str) -> tuple[QueryResult, float]:
    t = time.monotonic()
    r = sb.run(sql)
    return r, time.monotonic() - t


def _files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*"))


def _host_clean(tmp_path: Path, before: list[str]) -> None:
    assert _files(tmp_path) == before, "a statement created files on the host"


# -- files and rights ----------------------------------------------------------------------

FILE_ATTACKS = {
    "sqlite": [
        "ATTACH DATABASE '{d}/attached.db' AS x",
        "ATTACH '{d}/a2.db' AS x2 KEY ''",
        "VACUUM INTO '{d}/copy.db'",
        "/* hidden */ vacuum   into '{d}/copy2.db'",
        "VACUUM",
        "SELECT load_extension('{d}/evil.so')",
        "SELECT load_extension('libc.so.6', 'system')",
        "SELECT fts3_tokenizer('simple', x'4141414141414141')",
        "PRAGMA journal_mode = WAL",
        "PRAGMA temp_store_directory = '{d}'",
        "PRAGMA temp_store = FILE",
        "PRAGMA query_only = OFF",
        "PRAGMA writable_schema = ON",
        "PRAGMA locking_mode = EXCLUSIVE",
        "PRAGMA mmap_size = 1000000000",
        "PRAGMA cache_size = -100000000",
        "PRAGMA main.schema_version = 1",
        "SELECT * FROM pragma_database_list AS d, (SELECT load_extension('x'))",
    ],
    "mariadb": [
        "SELECT 'x' INTO OUTFILE '{d}/out.txt'",
        "SELECT a FROM t INTO DUMPFILE '{d}/dump.bin'",
        "LOAD DATA INFILE '/etc/passwd' INTO TABLE t",
        "LOAD DATA LOCAL INFILE '/etc/passwd' INTO TABLE t",
        "SELECT * FROM mysql.user",
        "CREATE USER evil IDENTIFIED BY 'x'",
        "GRANT ALL ON *.* TO CURRENT_USER()",
        "SET GLOBAL max_connections = 1",
        "SET GLOBAL general_log_file = '{d}/log.txt'",
        "CREATE DATABASE other_db",
        "CREATE PROCEDURE p() SELECT 1",
        "INSTALL SONAME 'ha_connect'",
        "SHUTDOWN",
        "CREATE TABLE d1 (a INT) ENGINE=MyISAM DATA DIRECTORY='{d}' INDEX DIRECTORY='{d}'",
        "CREATE TABLE d2 (a INT) ENGINE=InnoDB DATA DIRECTORY='{d}'",
        "CREATE TABLE d3 (a INT) ENGINE=MEMORY",
        "CREATE TABLE d4 (a INT) ENGINE=CSV",
        "CREATE TABLE d5 (a INT) ENGINE=MRG_MyISAM UNION=(t)",
        "SET SESSION enforce_storage_engine = MEMORY",
        "CREATE TABLE test.t (a INT)",
        "CREATE DATABASE test_x",
    ],
}


def test_file_and_rights_attacks_are_refused(backend: Backend, tmp_path: Path) -> None:
    """Files, extensions, other databases, global settings and storage engines: each refused, nothing written."""
    sb = backend.open()
    before = _files(tmp_path)
    for sql in FILE_ATTACKS[backend.kind]:
        r, took = _run(sb, sql.format(d=tmp_path))
        assert r.error is not None, (sql, r)
        assert took < SLACK, (sql, took)
    _host_clean(tmp_path, before)
    # The sandbox still answers afterwards, with its own data intact.
    assert sb.run("SELECT count(*) FROM t").rows == [(100,)]


@pytest.mark.mariadb
def test_mariadb_reads_no_files_and_no_other_database(server: Backend) -> None:
    """No file through LOAD_FILE, no other sample's tables or names, no right beyond its database."""
    backend = server
    mine, other = backend.open(), backend.open()
    r = mine.run("SELECT LOAD_FILE('/etc/passwd'), LOAD_FILE('/etc/shadow')")
    assert r.error is not None or r.rows == [(None, None)]  # no FILE right: NULL, never the file
    r = mine.run(f"SELECT * FROM `{other.name}`.t")
    assert r.error is not None and "denied" in r.error.lower()
    shown = {row[0] for row in mine.run("SHOW DATABASES").rows}
    assert shown <= {mine.name, "information_schema"}
    users = mine.run("SELECT user FROM information_schema.user_privileges")
    assert all(mine.name in str(row) for row in users.rows)
    privs = " ".join(str(row) for row in mine.run("SHOW GRANTS").rows).upper()
    assert "FILE" not in privs and "SUPER" not in privs and "GRANT OPTION" not in privs


@pytest.mark.mariadb
def test_mariadb_user_and_database_are_dropped(server: Backend) -> None:
    """Closing a sandbox drops its user and its database."""
    backend = server
    import pymysql

    from cycleqd.sandbox.databases import parse_mysql_url

    sb = backend.open()
    name = sb.name
    sb.close()
    con = pymysql.connect(**parse_mysql_url(backend.url))
    try:
        with con.cursor() as cur:
            cur.execute("SELECT count(*) FROM mysql.user WHERE user = %s", (name,))
            assert cur.fetchone()[0] == 0
            cur.execute("SHOW DATABASES LIKE %s", (name,))
            assert cur.fetchall() == ()
    finally:
        con.close()


# -- time ----------------------------------------------------------------------------------

TIME_ATTACKS = {
    "both": [
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r) SELECT count(*) FROM r",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r) SELECT n FROM r ORDER BY n DESC LIMIT 1",
        "SELECT count(*) FROM t a, t b, t c, t d, t e, t f",
        "SELECT count(*) FROM t a, t b, t c, t d, t e WHERE a.a || b.a || c.a LIKE '%9%9%9%'",
    ],
    "sqlite": [
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r) SELECT max(length(printf('%.*c', n % 1000, 'x'))) FROM r",
    ],
    "mariadb": [
        "SELECT SLEEP(100)",
        "SELECT BENCHMARK(10000000000, MD5('x'))",
        "BEGIN NOT ATOMIC SET @@max_statement_time = 0; SELECT SLEEP(100); END",
        "UPDATE t SET a = SLEEP(100)",
        "BEGIN NOT ATOMIC SET @@max_recursive_iterations = 4294967295; "
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r) SELECT count(*) FROM r; END",
    ],
}


def test_runaway_statements_end_quickly_with_an_error(backend: Backend) -> None:
    sb = backend.open()
    for sql in TIME_ATTACKS["both"] + TIME_ATTACKS[backend.kind]:
        r, took = _run(sb, sql)
        # MariaDB stops an endless recursion itself after max_recursive_iterations (an answer,
        # not an error); turned off, the time limit stops it (the case below).
        bounded = backend.kind == "mariadb" and sql.startswith("WITH RECURSIVE") and r.rows == [(1001,)]
        assert r.error is not None or bounded, (sql, r)
        assert took < LIMITS.seconds + SLACK, (sql, took)
    assert sb.run("SELECT 1").rows == [(1,)]


@pytest.mark.mariadb
def test_mariadb_timeout_survives_the_user_turning_it_off(server: Backend) -> None:
    """The watchdog stops a statement even after the user turned the server's timeout off."""
    sb = server.open()
    assert sb.run("SET SESSION max_statement_time = 0").error is None
    r, took = _run(sb, "SELECT SLEEP(100)")
    assert r.error is not None and took < LIMITS.seconds + SLACK


# -- memory and size -----------------------------------------------------------------------

BIG = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r LIMIT 10000000) "


def test_huge_results_are_capped_and_do_not_grow_the_worker(backend: Backend) -> None:
    sb = backend.open()
    sb.run("SELECT 1")
    base = _rss_mb()
    for sql in [BIG + "SELECT n, 'padding-padding-padding' FROM r",
                "SELECT a.a, b.a, c.a, d.a FROM t a, t b, t c, t d",
                BIG + "SELECT n FROM r ORDER BY n DESC",
                BIG + "SELECT group_concat(n) FROM r",
                "SELECT repeat('x', 1000000000)" if backend.kind == "mariadb"
                else "SELECT zeroblob(1000000000)",
                "SELECT * FROM t a, t b, t c, t d, t e ORDER BY a.b + b.b * c.b - d.b"]:
        r, took = _run(sb, sql)
        assert took < LIMITS.seconds + SLACK, (sql, took)
        assert r.error is not None or r.truncated or len(str(r.rows)) < LIMITS.max_bytes, (sql, r.error)
        assert len(r.rows) <= LIMITS.max_rows
        assert _rss_mb() - base < 64, (sql, _rss_mb() - base)
    assert sb.run("SELECT count(*) FROM t").rows == [(100,)]


def test_long_and_deeply_nested_sql_is_refused(backend: Backend) -> None:
    sb = backend.open()
    for sql in ["SELECT " + "(" * 20000 + "1" + ")" * 20000,
                "SELECT 1 WHERE 1 IN (" + ", ".join(["1"] * 60000) + ")",
                "SELECT '" + "x" * 300000 + "'",
                "SELECT " + " + ".join(["1"] * 40000),
                " UNION ALL ".join(["SELECT 1"] * 5000)]:
        r, took = _run(sb, sql)
        # a server may run a long compound select; its result is then capped
        assert r.error is not None or r.truncated, sql[:40]
        assert took < LIMITS.seconds + SLACK


def test_writes_stay_inside_the_sample_database(backend: Backend, tmp_path: Path) -> None:
    """Ordinary writes work (DBBench needs them) and are the sample's own."""
    first, second = backend.open(), backend.open()
    assert first.run("INSERT INTO t VALUES ('x', 1000)").error is None
    assert first.run("CREATE TABLE mine (z INTEGER)").error is None
    assert first.run("SELECT count(*) FROM t").rows == [(101,)]
    assert second.run("SELECT count(*) FROM t").rows == [(100,)]
    assert second.run("SELECT * FROM mine").error is not None


def test_the_db_task_plays_hostile_sql_through_the_sandbox(backend: Backend, tmp_path: Path) -> None:
    """End to end: a DBBench episode of hostile operations ends in seconds, wrong, with nothing written."""
    import json

    from cycleqd.engine.answers import ReplayEngine
    from cycleqd.tasks.dbbench import DBBenchTask

    row = {"description": "How many?", "add_description": "Table t.", "type": ["counting"], "label": ["2"],
           "table": {"table_name": "t", "table_info": {"columns": [{"name": "a", "type": "TEXT"}],
                                                       "rows": [["1"], ["2"]]}}}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(row) + "\n")
    target = tmp_path / "out"
    target.mkdir()
    ops = ["WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r) SELECT count(*) FROM r t1, r t2",
           f"ATTACH DATABASE '{target}/x.db' AS x" if backend.kind == "sqlite" else f"SELECT 1 INTO OUTFILE '{target}/x'",
           "SELECT * FROM t a, t b, t c, t d, t e, t f, t g, t h, t i, t j, t k, t l, t m, t n, t o, t p, t q, t r, t s, t u"]
    turns = [f"Action: Operation\n```sql\n{op}\n```" for op in ops] + ["Action: Answer\nFinal Answer: [\"3\"]"]
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"id": 0, "turns": turns}) + "\n")
    options = {"backend": "mysql", "url": backend.url} if backend.kind == "mariadb" else {}
    t = time.monotonic()
    res = DBBenchTask(data=str(data), **options).evaluate(ReplayEngine(str(answers)))
    assert time.monotonic() - t < 3 * (2.0 + SLACK)
    assert res.quality == 0.0 and res.samples[0].detail["rounds"] == 3
    assert list(target.iterdir()) == []


def test_sqlite_database_cannot_grow_without_bound(tmp_path: Path) -> None:
    """In memory, the database is the worker's memory: statement after statement it stays capped."""
    limits = SQLLimits(seconds=2.0, max_database_mb=16)

    def setup(con):
        con.execute("CREATE TABLE t (a TEXT, b INTEGER)")
        con.executemany("INSERT INTO t VALUES (?, ?)", [(str(i), i) for i in range(100)])

    sb = SQLiteSandbox(limits, setup=setup)
    try:
        base = _rss_mb()
        errors = [sb.run(f"INSERT INTO {table} SELECT printf('%.*c', 1000, 'x'), 1 FROM t a, t b").error
                  for table in ("t", "t", "t") ] + [
                  sb.run("CREATE TEMP TABLE big AS SELECT printf('%.*c', 1000, 'x') FROM t a, t b, t c").error]
        assert errors[-1] is not None and any(e and "full" in e for e in errors), errors
        assert _rss_mb() - base < 48
        assert sb.run("SELECT 1").rows == [(1,)]
    finally:
        sb.close()


def test_blank_and_comment_floods_are_handled_in_linear_time(backend: Backend) -> None:
    """Statements that are mostly blanks or comments (a degenerate model's output) return at once."""
    sb = backend.open()
    floods = [" " * 50_000, "\n\t " * 20_000, "-- c\n" * 10_000, "/* a */ " * 10_000, "/*" * 20_000,
              " " * 20_000 + "VACUUM", "/* x */ " * 5_000 + "vacuum"]
    for sql in floods:
        r, took = _run(sb, sql)
        assert took < SLACK, f"{sql[:12]!r}... took {took:.1f}s"
        if sql.rstrip().lower().endswith("vacuum"):
            assert r.error is not None
