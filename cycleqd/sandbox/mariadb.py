"""A MariaDB server that cycleqd starts and owns, set up for hostile tenants.

Model-written SQL reaches the server as a throw-away user (see
:mod:`cycleqd.sandbox.mysql`); what that user can do to the *machine* is decided
here, by how the server runs, not by screening statement text:

- rights: the server runs as an unprivileged user (``mysql`` when cycleqd is
  root, else cycleqd's own user), never as root; its files live in a private
  folder (mode 0700) owned by that user, and it listens on a unix socket in that
  folder only (``--skip-networking``: no port at all);
- files: ``--skip-symbolic-links`` makes the server ignore ``DATA DIRECTORY`` and
  ``INDEX DIRECTORY`` (MyISAM, Aria and InnoDB alike), so a table's files are
  always inside the data folder; ``--secure-file-priv`` points at an empty
  folder the server cannot write; ``--local-infile=0``; the temporary folder
  (sort files, internal on-disk tables) is the private folder's ``tmp``, never
  the host's ``/tmp`` or ``/dev/shm``;
- memory: ``--enforce-storage-engine=InnoDB`` turns every ``ENGINE=MEMORY``
  (and MyISAM, Aria, CSV, ARCHIVE, MERGE ...) table into an InnoDB table, whose
  pages live in a fixed buffer pool; ``max_heap_table_size``, ``tmp_table_size``,
  ``max_session_mem_used``, sort / join / read buffers are set *and* capped with
  ``--maximum-...``, so ``SET SESSION`` cannot raise them;
- disk: InnoDB's system and temporary tablespaces have a maximum size, internal
  on-disk temporary tables are capped by ``tmp_disk_table_size``, and the
  sandbox measures each sample's tablespaces after every statement (see
  :class:`cycleqd.sandbox.mysql.MySQLSandbox`'s ``max_database_mb``);
- accounts: only ``root@localhost`` with a random password is left (no
  anonymous user, no ``test`` / ``test_%`` database or grant); each sample gets
  its own user and database, dropped when its episode ends;
- life: stopped by its PID (SIGTERM, then SIGKILL) and its folder removed on
  :meth:`MariaDBServer.stop`, at interpreter exit, and, for a server whose
  owner was killed, at the next :meth:`MariaDBServer.start`.

A server given by URL instead (``backend: mysql`` with ``url:``) must be set up
the same way (the option file it needs is in :mod:`cycleqd.sandbox.mysql`'s
docstring); :func:`cycleqd.sandbox.mysql.server_warnings` checks what it can at
start-up.
"""
from __future__ import annotations

import atexit
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

PREFIX = "cycleqd-mariadb-"

class ServerLimits(BaseModel):
    """What the whole server, and one session on it, may use.

    Args:
        heap_table_mb: largest in-memory table (``max_heap_table_size`` and
            ``tmp_table_size``, also their maximum).
        session_mem_mb: memory one connection may hold (``max_session_mem_used``).
        tmp_disk_table_mb: largest internal on-disk temporary table.
        temp_tablespace_mb: InnoDB's temporary tablespace (all sessions together).
        system_tablespace_mb: InnoDB's system tablespace (undo logs; all together).
        buffer_pool_mb: InnoDB's page cache (fixed: the server's memory for table data).
        max_connections: connections at once (each open sample holds two).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    heap_table_mb: int = Field(16, gt=0, le=1024)
    session_mem_mb: int = Field(256, ge=64, le=4096)
    tmp_disk_table_mb: int = Field(256, gt=0, le=16384)
    temp_tablespace_mb: int = Field(512, ge=16, le=65536)
    system_tablespace_mb: int = Field(1024, ge=32, le=65536)
    buffer_pool_mb: int = Field(64, ge=8, le=65536)
    max_connections: int = Field(1024, ge=4, le=10000)


def server_options(limits: ServerLimits) -> list[str]:
    """The hardening flags (the option file in :mod:`cycleqd.sandbox.mysql`'s docstring, and more)."""
    heap, sess = f"{limits.heap_table_mb}M", f"{limits.session_mem_mb}M"
    capped = {
        "max-heap-table-size": heap, "tmp-table-size": heap,
        "tmp-disk-table-size": f"{limits.tmp_disk_table_mb}M", "max-session-mem-used": sess,
        "sort-buffer-size": "2M", "join-buffer-size": "1M", "join-buffer-space-limit": "8M",
        "read-buffer-size": "1M", "read-rnd-buffer-size": "1M", "mrr-buffer-size": "1M",
        "bulk-insert-buffer-size": "8M", "preload-buffer-size": "1M", "max-sort-length": "1024",
        "group-concat-max-len": "1M", "query-prealloc-size": "64K", "query-alloc-block-size": "64K",
        "transaction-prealloc-size": "64K", "transaction-alloc-block-size": "64K",
        "range-alloc-block-size": "64K", "max-length-for-sort-data": "1024",
    }
    flags = [f"--{k}={v}" for k, v in capped.items()] + [f"--maximum-{k}={v}" for k, v in capped.items()]
    return flags + [
        "--skip-symbolic-links", "--local-infile=0", "--enforce-storage-engine=InnoDB",
        "--innodb-file-per-table=1",
        f"--innodb-data-file-path=ibdata1:12M:autoextend:max:{limits.system_tablespace_mb}M",
        f"--innodb-temp-data-file-path=ibtmp1:12M:autoextend:max:{limits.temp_tablespace_mb}M",
        f"--innodb-buffer-pool-size={limits.buffer_pool_mb}M", "--innodb-log-file-size=32M",
        "--aria-pagecache-buffer-size=8M", "--aria-log-file-size=32M", "--key-buffer-size=4M",
        "--query-cache-type=0", "--query-cache-size=0", "--performance-schema=OFF",
        "--event-scheduler=OFF", f"--max-connections={limits.max_connections}",
        "--table-open-cache=400", "--table-definition-cache=400",
        "--skip-name-resolve", "--skip-log-bin", "--max-allowed-packet=16M",
        # MySQL 8's defaults, which DBBench's official databases were made with (its table hashes
        # are over utf8mb4 bytes): utf8mb4, an accent- and case-insensitive Unicode collation
        "--character-set-server=utf8mb4", "--collation-server=utf8mb4_unicode_520_ci",
        # a throw-away server: speed over durability
        "--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0", "--sync-frm=0",
    ]


def _find(*names: str) -> str | None:
    for name in names:
        exe = shutil.which(name) or next((f"{d}/{name}" for d in ("/usr/sbin", "/usr/bin", "/usr/local/sbin")
                                           if os.access(f"{d}/{name}", os.X_OK)), None)
        if exe:
            return exe
    return None


def mariadb_available() -> bool:
    """Whether a MariaDB server and its ``install-db`` are installed."""
    return bool(_find("mariadbd", "mysqld") and _find("mariadb-install-db", "mysql_install_db"))


class ServerUnavailable(RuntimeError):
    """MariaDB is not installed, or the server could not be started (the message says why)."""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _pid_is_server(pid: int, root: Path) -> bool:
    """Whether ``pid`` is a running mariadbd whose command line names ``root`` (not a reused PID)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(str(root).encode() in part for part in cmd) and _alive(pid)


def remove_stale(parent: str | Path | None = None) -> list[Path]:
    """Remove the folders of servers whose owner died without stopping them (their server is
    stopped first if still running). Returns the folders removed."""
    parent = Path(parent or tempfile.gettempdir())
    removed = []
    for root in parent.glob(PREFIX + "*"):
        try:
            owner = int((root / "owner").read_text())
            spid = int((root / "server.pid").read_text()) if (root / "server.pid").exists() else 0
        except (OSError, ValueError):
            owner, spid = 0, 0
        if owner and _alive(owner):
            continue
        try:
            if not owner and time.time() - root.stat().st_mtime < 300:
                continue  # another process may be writing its owner file right now
        except OSError:
            continue
        if spid and _pid_is_server(spid, root):
            _stop_pid(spid)
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
    return removed


def _stop_pid(pid: int, timeout: float = 30.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class MariaDBServer:
    """A MariaDB server on a unix socket in a private folder, run by an unprivileged user.

    Start it with :meth:`start`; ``url`` is what ``backend: mysql`` takes and
    ``connect`` the same as ``pymysql.connect`` keyword arguments (the
    administrative account). Stop it with :meth:`stop` (also a context manager,
    and stopped at interpreter exit).

    Attributes:
        root: the private folder (``data/``, ``tmp/``, the socket, the log).
        datadir: the data folder; each sample's database is a folder in it.
        pid: the server's process id.
    """

    def __init__(self, root: Path, proc: subprocess.Popen, password: str, user: str | None):
        self.root, self.proc, self.password, self.user = root, proc, password, user
        self.datadir = root / "data"
        self.socket = root / "mysqld.sock"
        self.pid = proc.pid
        self._lock = threading.Lock()
        self._stopped = False
        atexit.register(self.stop)

    @property
    def connect(self) -> dict[str, Any]:
        """``pymysql.connect`` keyword arguments of the administrative account."""
        return {"unix_socket": str(self.socket), "user": "root", "password": self.password}

    @property
    def url(self) -> str:
        """``mysql://root:PASSWORD@localhost/?unix_socket=PATH`` (for ``backend: mysql``)."""
        return f"mysql://root:{self.password}@localhost/?unix_socket={self.socket}"

    @classmethod
    def start(cls, *, limits: ServerLimits | None = None, parent: str | Path | None = None,
              timeout: float = 120.0, extra_options: tuple[str, ...] = ()) -> "MariaDBServer":
        """Create a fresh data folder, start the server and lock its accounts down.

        Args:
            limits: the server's memory and disk limits.
            parent: where the private folder is made (default: the system temp folder;
                the server user must be able to reach it).
            timeout: seconds to wait for ``install-db`` and for the server to answer.
            extra_options: more ``mariadbd`` flags, after (and so over) the hardening ones.

        Raises:
            ServerUnavailable: MariaDB or pymysql is not installed, or the server did not start.
        """
        limits = limits or ServerLimits()
        exe, install = _find("mariadbd", "mysqld"), _find("mariadb-install-db", "mysql_install_db")
        if not exe or not install:
            raise ServerUnavailable("MariaDB server not installed (Debian: apt-get install mariadb-server)")
        try:
            import pymysql
        except ImportError:
            raise ServerUnavailable("the mysql backend needs `pip install pymysql`") from None
        remove_stale(parent)
        user = None
        run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            user = "mysql"
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                raise ServerUnavailable("running as root, but there is no 'mysql' user to run MariaDB as") from None
            run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        root = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
        proc = None
        try:
            (root / "owner").write_text(str(os.getpid()))
            for sub in ("data", "tmp"):
                (root / sub).mkdir(mode=0o700)
            # secure_file_priv: a folder the server can neither write nor list.
            (root / "nofiles").mkdir(mode=0o500)
            if user:
                for p in (root, root / "data", root / "tmp"):
                    os.chown(p, run_as["user"], run_as["group"])
            env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "TMPDIR": str(root / "tmp"),
                   "LANG": "C"}
            r = subprocess.run([install, "--no-defaults", f"--datadir={root / 'data'}",
                                "--auth-root-authentication-method=normal", "--skip-test-db",
                                "--skip-name-resolve", f"--user={user or pwd.getpwuid(os.geteuid()).pw_name}",
                                f"--tmpdir={root / 'tmp'}"],
                               capture_output=True, text=True, timeout=timeout, env=env, cwd=root, **run_as)
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
                raise ServerUnavailable(f"mariadb-install-db failed: {' | '.join(tail)}")
            log = open(root / "server.log", "wb")
            proc = subprocess.Popen(
                [exe, "--no-defaults", f"--datadir={root / 'data'}", f"--tmpdir={root / 'tmp'}",
                 f"--socket={root / 'mysqld.sock'}", "--skip-networking", f"--pid-file={root / 'mysqld.pid'}",
                 f"--secure-file-priv={root / 'nofiles'}", *server_options(limits), *extra_options],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=root,
                start_new_session=True, **run_as)
            log.close()
            (root / "server.pid").write_text(str(proc.pid))
            deadline = time.monotonic() + timeout
            while True:
                try:
                    con = pymysql.connect(unix_socket=str(root / "mysqld.sock"), user="root", password="",
                                          connect_timeout=2, autocommit=True)
                    break
                except pymysql.MySQLError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        text = (root / "server.log").read_text(errors="replace")[-600:]
                        raise ServerUnavailable(f"MariaDB did not start: {text}") from None
                    time.sleep(0.1)
            password = secrets.token_urlsafe(24)
            try:
                _lock_down(con, password)
            finally:
                con.close()
        except BaseException:
            if proc is not None:
                _stop_pid(proc.pid)
                proc.wait()
            shutil.rmtree(root, ignore_errors=True)
            raise
        return cls(root, proc, password, user)

    def stop(self) -> None:
        """Stop the server by its PID (SIGTERM, SIGKILL after 30 s) and remove its folder."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            atexit.unregister(self.stop)

    def __enter__(self) -> "MariaDBServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _lock_down(con: Any, password: str) -> None:
    """Leave only ``root@localhost`` (random password): no anonymous, ``test`` or socket accounts."""
    with con.cursor() as cur:
        cur.execute("SELECT user, host FROM mysql.user")
        for user, host in cur.fetchall():
            if (user, host) not in (("root", "localhost"), ("mariadb.sys", "localhost")):
                cur.execute("DROP USER %s@%s", (user, host))
        cur.execute("DELETE FROM mysql.db WHERE user = '' OR db LIKE 'test%'")
        for db in ("test",):
            cur.execute(f"DROP DATABASE IF EXISTS `{db}`")
        cur.execute("FLUSH PRIVILEGES")
        cur.execute("ALTER USER root@localhost IDENTIFIED BY %s", (password,))
