"""Shared fixtures: a tiny random Llama family on disk, and a throw-away MariaDB server for the task and SQL tests."""
from __future__ import annotations

import json
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

from tiny_models import make_tiny_family

if TYPE_CHECKING:
    from cycleqd.sandbox.mariadb import MariaDBServer

#: Seconds each unit of work took in a measured run (``tests/durations.py``): the longest go first.
DURATIONS = Path(__file__).with_name("durations.json")
#: The files that start vLLM engines (their ``pytestmark`` names ``vllm``): one unit of work together.
VLLM_FILES = frozenset(str(p.relative_to(Path(__file__).parent.parent))
                       for p in Path(__file__).parent.rglob("test_*.py") if "pytest.mark.vllm" in p.read_text())


def unit(nodeid: str) -> str:
    """A test's unit of work under ``make test``: ``vllm`` for the vLLM files, else its file."""
    file = nodeid.split("::", 1)[0]
    return "vllm" if file in VLLM_FILES else file


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``pytest -n N`` (``make test``): units are collected longest first (``durations.json``; an
    unknown file counts a second per test), so that with ``--no-loadscope-reorder`` the workers take
    the long ones first and finish together."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    known = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    count: dict[str, int] = {}
    for item in items:
        count[unit(item.nodeid)] = count.get(unit(item.nodeid), 0) + 1
    weight = {u: known.get(u, float(n)) for u, n in count.items()}
    items.sort(key=lambda item: -weight[unit(item.nodeid)])  # stable: a file's tests keep their order


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``--dist loadfile`` with the vLLM files as one unit: one worker runs them one after another (two
    vLLM engines at once only slow each other down), the other workers take the other files."""
    if config.getoption("dist", "no") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesAndVLLM(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit(nodeid)

    return FilesAndVLLM(config, log)


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

