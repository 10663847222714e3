"""Shared fixtures: a tiny random Llama family on disk, and a throw-away MariaDB server for the task and SQL tests."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from tiny_models import make_tiny_family


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Session-wide tiny family with tasks a, b, c (see :func:`make_tiny_family`)."""
    return make_tiny_family(tmp_path_factory.mktemp("family"))


def _mariadbd() -> str | None:
    for name in ("mariadbd", "mysqld"):
        exe = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
        if exe:
            return exe
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mariadb_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MariaDB server on 127.0.0.1 in a temp data folder, stopped by its PID afterwards.

    Yields ``mysql://root@127.0.0.1:PORT/``. Skips when MariaDB is not installed
    (Debian: ``apt-get install mariadb-server``).
    """
    exe = _mariadbd()
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if not exe or not install:
        pytest.skip("MariaDB server not installed (apt-get install mariadb-server)")
    pytest.importorskip("pymysql")
    root = tmp_path_factory.mktemp("mariadb")
    datadir, sock, port = root / "data", root / "mysqld.sock", _free_port()
    user = ["--user=root"] if os.geteuid() == 0 else []
    r = subprocess.run([install, "--no-defaults", f"--datadir={datadir}", "--auth-root-authentication-method=normal",
                        "--skip-test-db", *user], capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        pytest.skip(f"mariadb-install-db failed: {r.stderr.strip().splitlines()[-1:]}")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([exe, "--no-defaults", f"--datadir={datadir}", f"--socket={sock}", f"--port={port}",
                             "--bind-address=127.0.0.1", "--skip-name-resolve", f"--pid-file={root / 'pid'}",
                             "--innodb-buffer-pool-size=32M", "--skip-log-bin", *user],
                            stdout=log, stderr=subprocess.STDOUT)
    import pymysql

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                pymysql.connect(host="127.0.0.1", port=port, user="root", password="", connect_timeout=2).close()
                break
            except pymysql.MySQLError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"MariaDB did not start: {(root / 'server.log').read_text()[-400:]}")
                time.sleep(0.2)
        yield f"mysql://root@127.0.0.1:{port}/"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def tiny_mini_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-child run over a tiny mini world built here (its models solve nothing: machinery only)."""
    from mini_run import make_mini_run

    root = tmp_path_factory.mktemp("tiny_mini_run")
    return make_mini_run(root, root / "world", "tiny")


@pytest.fixture(scope="session")
def small_world(request: pytest.FixtureRequest) -> Path:
    """The mini world's "small" size, built once into pytest's cache (reused while its recipe holds).

    Its experts solve most items of their own skill's common families, so teams, trajectories
    and the worker's checks see real, differing answers without the default world's build.
    """
    from cycleqd.mini.build import build_mini_world

    return build_mini_world(request.config.cache.mkdir("mini_small"), seed=0, size="small", progress=False)


@pytest.fixture(scope="session")
def mini_run(tmp_path_factory: pytest.TempPathFactory, small_world: Path) -> Path:
    """A 3-child run over the small mini world, episodes recorded: its experts solve many items,
    so teams and trajectories have real answers."""
    from mini_run import make_mini_run

    return make_mini_run(tmp_path_factory.mktemp("mini_run"), small_world, "small", n=12)
