"""Shared fixtures: a tiny random Llama family on disk, and a throw-away MariaDB server for the task and SQL tests."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # ``pytest -n N``: N workers share the cores, so each computes with its share of them. With more
    # threads than that, a thread of a tiny model's many small parallel steps often waits for a sibling
    # the other worker's process has pushed off its core. Subprocesses (runs, Ray workers) inherit it.
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from tiny_models import make_tiny_family  # noqa: E402

if TYPE_CHECKING:
    from cycleqd.sandbox.mariadb import MariaDBServer


@pytest.fixture(scope="module", autouse=True)
def _one_vllm_file_at_a_time(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Under ``make test`` (``pytest -n 2 --dist loadfile``) the files marked ``vllm`` take turns: two
    vLLM engines at once pin their threads to the same cores and only slow each other down."""
    if request.node.get_closest_marker("vllm") is None or "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    with open(tmp_path_factory.getbasetemp().parent / "vllm.lock", "a") as lock:  # the run's, shared by its workers
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Session-wide tiny family with tasks a, b, c (see :func:`make_tiny_family`)."""
    return make_tiny_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator["MariaDBServer"]:
    """The hostile-tenant MariaDB server cycleqd starts itself (:class:`cycleqd.sandbox.mariadb.MariaDBServer`):
    an unprivileged user, a private folder, a unix socket only; stopped by its PID afterwards.

    Skips when MariaDB or pymysql is not installed (Debian: ``apt-get install mariadb-server``).
    """
    from cycleqd.sandbox.mariadb import MariaDBServer, mariadb_available

    if not mariadb_available():
        pytest.skip("MariaDB server not installed (apt-get install mariadb-server)")
    pytest.importorskip("pymysql")
    server = MariaDBServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mariadb_url(mariadb_server) -> str:
    """``mysql://root:PASSWORD@localhost/?unix_socket=PATH`` of :func:`mariadb_server`."""
    return mariadb_server.url


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

