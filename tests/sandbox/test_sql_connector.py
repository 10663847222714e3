"""DBBench observations under ``protocol: official`` against the real client of the official harness.

The oracle is mysql-connector-python 8.0.32 (its C extension, as fishfarm pins it) driven
exactly as fishfarm's ``Container.execute`` drives it: reconnect, ``use `db```, ``execute(sql,
multi=True)``, ``str(fetchall())``, commit, ``str(e)`` on an exception, the 800-character cut.
The same statements, in the same order, then run through cycleqd's two backends
(:class:`MariaDBShared` on the same server, :class:`SQLiteShared` in process) and every string
must be equal.
"""
from __future__ import annotations

import time

import pytest

from cycleqd.sandbox import connector
from cycleqd.sandbox.databases import parse_mysql_url
from cycleqd.sandbox.shared_databases import MariaDBShared, SQLiteShared, build_sql, hash_query

pytestmark = pytest.mark.mariadb

DB = "Game Results"
COLUMNS = ["Name", "Score", "Note"]
ROWS = [["Ann", "1", "first"], ["bob", "2.5", "it's"], ["Pelotaslóide", "10", None]] + \
       [[f"player number {i:03d} with a long name", str(i), "x" * 10] for i in range(40)]

# Statements both backends must show exactly as the connector does; state carries over between them.
COMMON = [
    "SELECT * FROM `Game Results` WHERE Name = 'ANN'",             # case-insensitive text
    "SELECT Name, Score, Note FROM `Game Results` LIMIT 3",        # str values, 'None' from str(None)
    "SELECT COUNT(*) FROM `Game Results`",                         # int
    "SELECT SUM(Score), AVG(Score) FROM `Game Results` WHERE Name IN ('Ann', 'bob')",  # DOUBLE over text
    "SELECT SUM(1), AVG(1) FROM `Game Results`",                   # DECIMAL over integers
    "SELECT MAX(Name), MIN(Name) FROM `Game Results` WHERE Name < 'c'",
    "SELECT CONCAT(Name, '-', Score) FROM `Game Results` LIMIT 2",
    "SELECT Name FROM `Game Results` WHERE Name = 'nobody'",       # empty result
    "SELECT Name FROM `Game Results` LIMIT 0",
    "SELECT * FROM `Game Results`",                                # long: cut at 800 characters
    "SELECT Name FROM `Game Results` WHERE Name LIKE 'Pel%'",
    "SELECT Name FROM `Game Results` WHERE Note = 'it''s'",
    "SELECT COUNT(DISTINCT Note) FROM `Game Results`",
    "SELECT Name, COUNT(*) FROM `Game Results` GROUP BY Name HAVING COUNT(*) > 1",
    "INSERT INTO `Game Results` (Name, Score, Note) VALUES ('Zed', '7', 'new')",  # no result set
    "SELECT COUNT(*) FROM `Game Results`",
    "UPDATE `Game Results` SET Score = '9' WHERE Name = 'Zed'",
    "SELECT Score FROM `Game Results` WHERE Name = 'Zed'",
    "INSERT INTO `Game Results` (Name) VALUES ('Nul')",
    "SELECT Score FROM `Game Results` WHERE Name = 'Nul'",         # NULL
    "DELETE FROM `Game Results` WHERE Name = 'Zed'",
    "SELECT COUNT(*) FROM `Game Results`",
    "SELEC * FROM `Game Results`",                                 # syntax error
    "SELECT Nope FROM `Game Results`",                             # unknown column, each clause
    "SELECT Name FROM `Game Results` WHERE Nope = 1",
    "SELECT Name FROM `Game Results` ORDER BY Nope",
    "SELECT * FROM missing",                                       # unknown table
    "SELECT 1;",                                                   # one statement with its ';'
    "SELECT 1; SELECT 2",                                          # several: out of sync
    "INSERT INTO `Game Results` (Name) VALUES ('A2'); INSERT INTO `Game Results` (Name) VALUES ('A3')",
    "SELECT COUNT(*) FROM `Game Results`",                         # ... and rolled back
    "INSERT INTO `Game Results` (Name) VALUES ('A4'); COMMIT",
    "SELECT COUNT(*) FROM `Game Results`",                         # ... unless committed
    "SELECT Name FROM `Game Results` WHERE Name = 'A4'; SELEC 2",  # a later statement fails
    hash_query(DB, COLUMNS),                                       # the harness's table hash
]

# Column types the text tables of DBBench never hold but expressions do (MariaDB backend only).
TYPES = [
    "SELECT 1.5, CAST(1 AS DECIMAL(5,2)), 2/3, 1e3, CAST(1.25 AS DOUBLE), 0.1 + 0.2, NULL",
    "SELECT DATE('2020-01-02'), TIMESTAMP('2020-01-02 03:04:05'), TIME('01:02:03'), TIME('-01:02:03.5'), "
    "YEAR('2020-01-01')",
    "SELECT BINARY 'a', X'41', b'101', CAST('é' AS BINARY), MD5('a'), JSON_OBJECT('a', 1), 'a\"b'",
    "SELECT CAST(1 AS UNSIGNED), CAST(-1 AS SIGNED), 18446744073709551615, 1 = 1, ROUND(2.5)",
    "SELECT COUNT(*), SUM(Score), AVG(Score), ROUND(AVG(Score), 2) FROM `Game Results`",
    "DESCRIBE `Game Results`",
    "SHOW TABLES",
    "SET @x = 1",
    "SELECT @x",                                                   # a new session per call
]


class Container:
    """fishfarm's ``Container.execute`` on mysql-connector-python 8.0.32 (C extension)."""

    def __init__(self, mariadb_url: str):
        mysql_connector = pytest.importorskip("mysql.connector")
        assert mysql_connector.__version__ == "8.0.32" and mysql_connector.HAVE_CEXT
        kw = parse_mysql_url(mariadb_url)
        kw = dict(user=kw["user"], password=kw["password"], unix_socket=kw["unix_socket"])
        self.conn = mysql_connector.connect(**kw)
        self.watcher = mysql_connector.connect(**kw)

    def settled(self) -> None:
        """Wait until the server has run every statement of the last call. The connector returns after
        the first result; the next reconnect would otherwise cut the rest off while it still runs
        (cycleqd always lets a call finish: the deterministic outcome of the official harness)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.watcher.reconnect()
            with self.watcher.cursor() as cur:
                cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s AND COMMAND = 'Query'",
                            (self.conn.connection_id,))
                if cur.fetchall() == [(0,)]:
                    return
            time.sleep(0.01)

    def execute(self, sql: str, database: str | None = None) -> str:
        self.settled()
        self.conn.reconnect()
        try:
            with self.conn.cursor() as cursor:
                if database:
                    cursor.execute(f"use `{database}`;")
                    cursor.fetchall()
                cursor.execute(sql, multi=True)
                result = str(cursor.fetchall())
            self.conn.commit()
        except Exception as e:
            result = str(e)
        if len(result) > 800:
            result = result[:800] + "[TRUNCATED]"
        return result

    def close(self) -> None:
        self.conn.close()
        self.watcher.close()


def _oracle(mariadb_url: str, statements: list[str]) -> list[str]:
    """The set-up SQL, then each statement, then one in the dropped database, through the connector."""
    box = Container(mariadb_url)
    try:
        box.execute(build_sql(DB, COLUMNS, ROWS))
        out = [box.execute(sql, DB) for sql in statements]
        box.execute(f"drop database `{DB}`")
        out.append(box.execute("SELECT 1", DB))
        return out
    finally:
        box.close()


def _ours(shared, statements: list[str]) -> list[str]:
    try:
        shared.create(DB, COLUMNS, ROWS)
        out = [shared.table_hash(DB, COLUMNS) if sql == hash_query(DB, COLUMNS) else shared.execute(sql, DB)
               for sql in statements]
        shared.drop(DB)
        out.append(shared.execute("SELECT 1", DB))
        return out
    finally:
        shared.close()


def _compare(want: list[str], got: list[str], statements: list[str]) -> None:
    diffs = [(sql, w, g) for sql, w, g in zip(statements + ["(dropped) SELECT 1"], want, got) if w != g]
    assert not diffs, "\n".join(f"{sql!r}\n  connector: {w!r}\n  cycleqd:   {g!r}" for sql, w, g in diffs)


def test_mariadb_backend_shows_what_the_official_connector_shows(mariadb_url) -> None:
    """Every statement of both corpora (values of each type, empty results, writes, errors,
    several statements, a long result, the table hash, a dropped database) reads the same as
    through mysql-connector-python 8.0.32, and the writes leave the same table behind."""
    statements = COMMON + TYPES
    want = _oracle(mariadb_url, statements)
    got = _ours(MariaDBShared(parse_mysql_url(mariadb_url)), statements)
    _compare(want, got, statements)
    # the corpus shows what it is meant to
    assert want[COMMON.index("SELECT 1; SELECT 2")] == connector.OUT_OF_SYNC
    assert want[COMMON.index("SELECT Nope FROM `Game Results`")].startswith("1054 (42S22): Unknown column 'Nope'")
    assert want[14] == "[]" and want[9].endswith("[TRUNCATED]") and len(want[9]) == 811
    assert "Decimal('1.00')" in want[len(COMMON)] and "bytearray(b'a')" in want[len(COMMON) + 2]


def test_sqlite_emulation_shows_what_the_official_connector_shows(mariadb_url) -> None:
    """The in-process emulation gives the connector's strings for the common corpus, state included."""
    want = _oracle(mariadb_url, COMMON)
    got = _ours(SQLiteShared(), COMMON)
    _compare(want, got, COMMON)
    # what the emulation itself must show, whatever the server says: a write's `[]`, the
    # connector's error format, several statements out of sync, the 800-character cut
    assert got[14] == "[]" and got[COMMON.index("SELECT 1; SELECT 2")] == connector.OUT_OF_SYNC
    assert got[COMMON.index("SELECT Nope FROM `Game Results`")].startswith("1054 (42S22): Unknown column 'Nope'")
    assert got[9].endswith("[TRUNCATED]") and len(got[9]) == 811


def test_official_set_up_shares_one_database_per_table_name(mariadb_url) -> None:
    """Two rows with one table name: the same columns merge their rows, other columns leave the
    second row's rows out, duplicate columns make no table; one drop removes it for both. Both
    backends agree with the connector on what each row then sees."""
    box = Container(mariadb_url)
    cases = {
        "merged": ([["a", "b"], [["1", "x"]]], [["a", "b"], [["2", "y"]]]),
        "kept": ([["a", "b"], [["1", "x"]]], [["a", "c"], [["2", "y"]]]),
        "duplicate": ([["Score", "score"], [["1", "2"]]], [["Score", "b"], [["3", "4"]]]),
    }
    seen: dict[str, list[str]] = {}
    try:
        for name, rows in cases.items():
            for columns, data in rows:
                box.execute(build_sql(name, columns, data))
            seen[name] = [box.execute(f"SELECT * FROM `{name}`", name)]
            box.execute(f"drop database `{name}`")
    finally:
        box.close()
    assert seen["merged"] == ["[('1', 'x'), ('2', 'y')]"] and seen["kept"] == ["[('1', 'x')]"]
    assert seen["duplicate"] == ["[('3', '4')]"]  # the first CREATE failed, the second made the table
    for shared in (MariaDBShared(parse_mysql_url(mariadb_url)), SQLiteShared()):
        try:
            for name, rows in cases.items():
                for columns, data in rows:
                    shared.create(name, columns, data)
                assert [shared.execute(f"SELECT * FROM `{name}`", name)] == seen[name], (type(shared), name)
                shared.drop(name)
                assert shared.execute("SELECT 1", name) == f"1049 (42000): Unknown database '{name}'"
        finally:
            shared.close()


def test_model_sql_in_the_shared_databases_stays_contained(mariadb_url, mariadb_server) -> None:
    """Model SQL runs as a throw-away user: the evaluation's databases only (a wildcard in a table
    name grants nothing more), no server tables or files, no new databases, the time limit holds;
    closing drops the user and every database."""
    from cycleqd.sandbox.sqlite import SQLLimits

    kw = parse_mysql_url(mariadb_url)
    shared = MariaDBShared(kw, SQLLimits(seconds=1.0))
    try:
        shared.create("t_x", ["a"], [["1"]])
        assert shared.execute("SELECT * FROM t_x", "t_x") == "[('1',)]"
        with shared.admin.cursor() as cur:
            cur.execute("CREATE DATABASE tax")  # matched by the pattern t_x if '_' were a wildcard
        assert shared.execute("SELECT LOAD_FILE('/etc/passwd')", "t_x") == "[(None,)]"  # no FILE right
        for sql in ("SELECT * FROM mysql.user", "CREATE DATABASE evil",
                    "SELECT * FROM tax.nothing", "SELECT * FROM t_x INTO OUTFILE '/tmp/x'"):
            out = shared.execute(sql, "t_x")
            assert "denied" in out.lower() and out.split(" ", 1)[0].isdigit(), (sql, out)
        assert shared.execute("SELECT 1", "tax").startswith("1044 (42000): Access denied")
        start = time.monotonic()
        shared.execute("SELECT SLEEP(10)", "t_x")
        assert time.monotonic() - start < 4
        user = shared.user
    finally:
        shared.close()
    import pymysql

    con = pymysql.connect(**kw)
    try:
        with con.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM mysql.user WHERE user = %s", (user,))
            assert cur.fetchone()[0] == 0
            cur.execute("SHOW DATABASES LIKE 't\\_x'")
            assert cur.fetchall() == ()
            cur.execute("DROP DATABASE tax")
    finally:
        con.close()
