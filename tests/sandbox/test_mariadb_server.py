"""The MariaDB server cycleqd starts itself holds hostile tenants: no files outside its data
folder, capped memory and disk per sample, nothing of a sample left after its episode, no
sample reading another's rows, and a start-up check that names what a user's server lacks.

The attacks here talk to the server directly as a sample's user (not through the text
screening of :class:`cycleqd.sandbox.mysql.MySQLSandbox`): the server itself must hold.
"""
from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

pytestmark = pytest.mark.mariadb

pymysql = pytest.importorskip("pymysql")

from cycleqd.sandbox.mariadb import MariaDBServer
from cycleqd.sandbox.mysql import MySQLSandbox, server_warnings
from cycleqd.sandbox.sqlite import SQLLimits

LIMITS = SQLLimits(seconds=2.0)


class Tenant:
    """A database and a user with a sample's rights on it, connected straight to the server."""

    def __init__(self, server: MariaDBServer):
        self.server = server
        self.name = f"cq_{secrets.token_hex(6)}"
        self.admin = pymysql.connect(**server.connect, autocommit=True)
        password = secrets.token_urlsafe(16)
        with self.admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{self.name}`")
            cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (self.name, password))
            cur.execute(f"GRANT ALL ON `{self.name}`.* TO %s@'%%'", (self.name,))
        self.con = pymysql.connect(unix_socket=str(server.socket), user=self.name, password=password,
                                   database=self.name, autocommit=True)

    def sql(self, statement: str) -> tuple | str:
        """Rows, or the error text."""
        try:
            with self.con.cursor() as cur:
                cur.execute("SET SESSION max_statement_time = 2")
                cur.execute(statement)
                return cur.fetchall()
        except pymysql.MySQLError as e:
            return f"error: {e}"

    def close(self) -> None:
        self.con.close()
        with self.admin.cursor() as cur:
            cur.execute("DROP USER IF EXISTS %s@'%%'", (self.name,))
            cur.execute(f"DROP DATABASE IF EXISTS `{self.name}`")
        self.admin.close()


@pytest.fixture
def tenant(mariadb_server: MariaDBServer) -> Iterator[Tenant]:
    t = Tenant(mariadb_server)
    yield t
    t.close()


def _rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) // 1024


def _named(roots: list[Path], marker: str) -> list[str]:
    """Files or folders under ``roots`` (two levels) whose name contains ``marker``."""
    found = []
    for root in roots:
        for p in list(root.glob("*")) + list(root.glob("*/*")):
            if marker in p.name:
                found.append(str(p))
    return found


def test_server_runs_unprivileged_in_a_private_folder_without_a_port(mariadb_server: MariaDBServer) -> None:
    """Not root; its folder is 0700 and its own; it listens on its unix socket only."""
    st = os.stat(f"/proc/{mariadb_server.pid}")
    assert st.st_uid != 0
    folder = os.stat(mariadb_server.root)
    assert folder.st_uid == st.st_uid and folder.st_mode & 0o077 == 0
    con = pymysql.connect(**mariadb_server.connect)
    try:
        with con.cursor() as cur:
            cur.execute("SELECT @@skip_networking, @@have_symlink, @@tmpdir, @@enforce_storage_engine")
            skip_net, symlink, tmpdir, engine = cur.fetchone()
    finally:
        con.close()
    assert skip_net == 1 and symlink == "DISABLED" and engine == "InnoDB"
    assert Path(tmpdir).resolve().is_relative_to(mariadb_server.root.resolve())


def test_data_directory_creates_nothing_outside_the_datadir(tenant: Tenant) -> None:
    """MyISAM, Aria, InnoDB and partition DATA / INDEX DIRECTORY, typed or built at run time,
    into folders the server user could write: no file lands there, every table's files stay in
    the data folder."""
    open_dir = Path(tempfile.mkdtemp(prefix="cq-target-"))
    open_dir.chmod(0o777)  # the server user could write here, if the server let it
    targets = [open_dir, Path("/dev/shm"), Path("/tmp"), Path("/etc")]
    mark = secrets.token_hex(4)
    try:
        attacks = [
            f"CREATE TABLE m{mark} (a INT) ENGINE=MyISAM DATA DIRECTORY='{open_dir}' INDEX DIRECTORY='{open_dir}'",
            f"CREATE TABLE a{mark} (a INT) ENGINE=Aria DATA DIRECTORY='/dev/shm' INDEX DIRECTORY='/dev/shm'",
            f"CREATE TABLE i{mark} (a INT) ENGINE=InnoDB DATA DIRECTORY='{open_dir}'",
            f"CREATE TABLE e{mark} (a INT) ENGINE=MyISAM DATA DIRECTORY='/etc' INDEX DIRECTORY='/etc'",
            f"CREATE TABLE p{mark} (a INT) PARTITION BY HASH(a) (PARTITION x DATA DIRECTORY='{open_dir}')",
            f"EXECUTE IMMEDIATE CONCAT('CREATE TABLE d{mark} (a INT) DA', 'TA DIRECTORY=', QUOTE('{open_dir}'))",
        ]
        for mode in ("DEFAULT", "''"):  # '' lets the server substitute its engine instead of refusing
            assert not isinstance(tenant.sql(f"SET SESSION sql_mode = {mode}"), str)
            for sql in attacks:
                tenant.sql(sql)
            tenant.sql(f"CREATE TABLE z{mark} (a INT)")
            tenant.sql(f"ALTER TABLE z{mark} ENGINE=MyISAM DATA DIRECTORY='{open_dir}'")
            tenant.sql(f"INSERT INTO z{mark} VALUES (1)")
            made = tenant.sql("SHOW TABLES")
            assert len(made) >= 2, made  # substituted or ignored, the tables exist: only their place is refused
            for (table,) in made:
                tenant.sql(f"INSERT INTO `{table}` VALUES (1)")
            assert _named(targets, mark) == [], "a table's files landed outside the data folder"
            for (table,) in made:
                tenant.sql(f"DROP TABLE `{table}`")
        assert _named(targets, mark) == [], "a table's files landed outside the data folder"
        assert list(open_dir.iterdir()) == []
    finally:
        for p in open_dir.glob("**/*"):
            p.unlink() if p.is_file() else None
        for p in sorted(open_dir.glob("**/*"), reverse=True):
            p.rmdir()
        open_dir.rmdir()


def test_the_sandbox_refuses_data_directory_in_any_spelling(mariadb_url: str) -> None:
    """The shared screening refuses the clause however it is written (the server ignores it anyway)."""
    from cycleqd.sandbox.databases import parse_mysql_url

    with MySQLSandbox(parse_mysql_url(mariadb_url), LIMITS) as sb:
        for sql in ["CREATE TABLE t (a INT) DATA DIRECTORY='/tmp'",
                    "create table t (a int) engine=myisam index   directory = '/tmp'",
                    "CREATE TABLE t (a INT) /*!50000 DATA */ /*!DIRECTORY='/tmp'*/",
                    "ALTER TABLE t DATA/**/DIRECTORY='/tmp'"]:
            r = sb.run(sql)
            assert r.error is not None and "DIRECTORY" in r.error, (sql, r)
        # the words in a value are data, not the clause
        assert sb.run("CREATE TABLE t (a TEXT)").error is None
        assert sb.run("INSERT INTO t VALUES ('data directory')").error is None


def test_memory_tables_cannot_grow_the_server(mariadb_server: MariaDBServer, tenant: Tenant) -> None:
    """SET SESSION cannot raise the heap / temp-table / session-memory caps, MEMORY tables are
    refused (or made InnoDB), and filling tables as fast as possible leaves the server's memory
    bounded (the reported attack took it from 278 to 1,689 MB in 3 statements)."""
    base = _rss_mb(mariadb_server.pid)
    for var in ("max_heap_table_size", "tmp_table_size", "max_session_mem_used", "sort_buffer_size"):
        tenant.sql(f"SET SESSION {var} = 1099511627776")
        ((value,),) = tenant.sql(f"SELECT @@session.{var}")
        assert value <= 256 << 20, (var, value)
    r = tenant.sql("CREATE TABLE h (a LONGBLOB) ENGINE=MEMORY")
    assert isinstance(r, str)  # refused under the default sql_mode
    tenant.sql("SET SESSION sql_mode = ''")
    tenant.sql("CREATE TABLE h (a VARCHAR(60000)) ENGINE=MEMORY")
    tenant.sql("CREATE TEMPORARY TABLE th (a VARCHAR(60000)) ENGINE=MEMORY")
    engines = {row[1] for row in tenant.sql(
        f"SELECT table_name, engine FROM information_schema.tables WHERE table_schema = '{tenant.name}'")}
    assert engines <= {"InnoDB"}, engines
    for table in ("h", "th"):
        tenant.sql(f"INSERT INTO {table} SELECT repeat('x', 60000) FROM seq_1_to_100000")
    # an internal temporary table too: a GROUP BY over a large generated set
    tenant.sql("SELECT a, count(*) FROM (SELECT concat(seq, repeat('z', 2000)) a FROM seq_1_to_10000000) d "
               "GROUP BY a ORDER BY 2 DESC LIMIT 1")
    grown = _rss_mb(mariadb_server.pid) - base
    assert grown < 256, f"the server grew by {grown} MB"


def test_a_sample_over_its_disk_cap_is_stopped_and_its_tables_dropped(mariadb_url: str,
                                                                     mariadb_server: MariaDBServer) -> None:
    """Inserting until full ends in an error; the sample's files are gone at once, later
    statements are refused, and a MEMORY table asked for becomes this capped kind."""
    from cycleqd.sandbox.databases import parse_mysql_url

    limits = SQLLimits(seconds=2.0, max_database_mb=16)
    with MySQLSandbox(parse_mysql_url(mariadb_url), limits) as sb:
        assert sb.run("SET SESSION sql_mode = ''").error is None
        assert sb.run("SET SESSION max_heap_table_size = 1099511627776").error is None
        assert sb.run("CREATE TABLE big (a LONGBLOB) ENGINE=MEMORY").error is None
        errors = [sb.run("INSERT INTO big SELECT repeat('x', 1000000) FROM seq_1_to_30").error for _ in range(4)]
        assert any(e and "cap" in e for e in errors), errors
        assert "cap" in (sb.run("SELECT 1").error or "")
        assert sb.database_bytes() == 0
        assert not (mariadb_server.datadir / sb.name / "big.ibd").exists()


def _server_state(server: MariaDBServer) -> tuple:
    con = pymysql.connect(**server.connect)
    try:
        with con.cursor() as cur:
            cur.execute("SHOW DATABASES")
            dbs = sorted(r[0] for r in cur.fetchall())
            cur.execute("SELECT user, host FROM mysql.user ORDER BY 1, 2")
            users = cur.fetchall()
    finally:
        con.close()
    return dbs, users


def test_nothing_of_a_sample_is_left_after_its_episode(mariadb_url: str, mariadb_server: MariaDBServer) -> None:
    """After close: the same databases, users, data-folder entries and an empty temp folder as before."""
    from cycleqd.sandbox.databases import parse_mysql_url

    before = _server_state(mariadb_server)
    entries = sorted(p.name for p in mariadb_server.datadir.iterdir())
    sb = MySQLSandbox(parse_mysql_url(mariadb_url), LIMITS)
    name = sb.name
    for sql in ["CREATE TABLE t (a TEXT)", "INSERT INTO t VALUES ('x')", "CREATE VIEW v AS SELECT * FROM t",
                "CREATE TEMPORARY TABLE tmp (a INT)", "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW SET @x = 1",
                "CREATE INDEX i ON t (a(10))", "SELECT a, count(*) FROM t GROUP BY a"]:
        assert sb.run(sql).error is None, sql
    assert (mariadb_server.datadir / name).is_dir()
    sb.close()
    assert _server_state(mariadb_server) == before
    assert sorted(p.name for p in mariadb_server.datadir.iterdir()) == entries
    assert not (mariadb_server.datadir / name).exists()
    assert list((mariadb_server.root / "tmp").iterdir()) == []


def test_a_sample_cannot_read_or_share_another_samples_rows(mariadb_url: str) -> None:
    """No path from one sample's database to another's: not by name, not through information_schema,
    not through a shared `test` database, not by logging in anonymously."""
    from cycleqd.sandbox.databases import parse_mysql_url

    connect = parse_mysql_url(mariadb_url)
    with MySQLSandbox(connect, LIMITS) as first, MySQLSandbox(connect, LIMITS) as second:
        assert first.run("CREATE TABLE secret (s TEXT)").error is None
        assert first.run("INSERT INTO secret VALUES ('first-sample-row')").error is None
        for sql in [f"SELECT * FROM `{first.name}`.secret",
                    f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{first.name}'",
                    "CREATE TABLE test.shared (s TEXT)", "CREATE DATABASE test", "USE test",
                    "CREATE TABLE test_1.shared (s TEXT)", "SELECT * FROM test.shared"]:
            r = second.run(sql)
            assert r.error is not None or r.rows == [], (sql, r)
            assert "first-sample-row" not in str(r.rows)
    host = {k: v for k, v in connect.items() if k != "password"}
    for user in ("", "test", "root"):
        with pytest.raises(pymysql.MySQLError):
            pymysql.connect(**{**host, "user": user, "password": ""}, connect_timeout=5).close()


def test_server_warnings_name_what_a_users_server_lacks(mariadb_server: MariaDBServer) -> None:
    """On an account like the one a user should give (no FILE / SUPER) the hardened server gives
    no warning; an anonymous account, a `test` grant and a FILE right are each named."""
    admin = pymysql.connect(**mariadb_server.connect, autocommit=True)
    password = secrets.token_urlsafe(16)
    try:
        with admin.cursor() as cur:
            cur.execute("CREATE USER cq_admin@localhost IDENTIFIED BY %s", (password,))
            cur.execute("GRANT CREATE USER, PROCESS, RELOAD ON *.* TO cq_admin@localhost")
            cur.execute("GRANT SELECT ON mysql.* TO cq_admin@localhost")
        connect = {"unix_socket": str(mariadb_server.socket), "user": "cq_admin", "password": password}
        assert server_warnings(connect) == []
        with admin.cursor() as cur:
            cur.execute("CREATE USER ''@localhost")
            cur.execute("GRANT ALL ON `test\\_%`.* TO ''@localhost")
            cur.execute("GRANT FILE ON *.* TO cq_admin@localhost")
        found = server_warnings(connect)
        assert any("anonymous" in w for w in found), found
        assert any("test" in w for w in found), found
        assert any("FILE" in w for w in found), found
    finally:
        with admin.cursor() as cur:
            cur.execute("DROP USER IF EXISTS ''@localhost")
            cur.execute("DROP USER IF EXISTS cq_admin@localhost")
        admin.close()


def test_server_warnings_name_a_server_without_the_hardening() -> None:
    """A server with symbolic links on and no heap maximum is named for both."""
    with MariaDBServer.start(extra_options=("--symbolic-links", "--maximum-max-heap-table-size=4G",
                                            "--maximum-tmp-table-size=4G")) as server:
        found = server_warnings(server.connect)
    assert any("symbolic links" in w for w in found), found
    assert any("max_heap_table_size" in w for w in found), found
    assert any("tmp_table_size" in w for w in found), found


def test_stop_ends_the_server_by_pid_and_removes_its_folder() -> None:
    """After stop() the process is gone and the private folder with its data is removed."""
    server = MariaDBServer.start()
    pid, root = server.pid, server.root
    server.stop()
    time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or "mariadbd" not in Path(f"/proc/{pid}/cmdline").read_text()
    assert not root.exists()


def test_a_dead_owners_server_folder_is_removed_at_the_next_start(mariadb_server: MariaDBServer,
                                                                  tmp_path: Path) -> None:
    """A folder whose owner died (SIGKILL) is removed; a live owner's server is left alone."""
    import subprocess

    from cycleqd.sandbox.mariadb import PREFIX, remove_stale

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{PREFIX}stale"
    (stale / "data").mkdir(parents=True)
    (stale / "owner").write_text(str(dead.pid))
    live = tmp_path / f"{PREFIX}live"
    live.mkdir()
    (live / "owner").write_text(str(os.getpid()))
    assert remove_stale(tmp_path) == [stale]
    assert not stale.exists() and live.exists()
    remove_stale(mariadb_server.root.parent)
    assert mariadb_server.root.exists()
