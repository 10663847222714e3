"""A Ray cluster of 4 nodes on this machine: workers spread over the nodes, a node lost mid-run, the driver killed.

Each node (the head included) runs in a network namespace the test creates (``ip netns``, veth pairs
to a bridge in one more namespace), with an address of its own on 10.77.x.0/24; the driver joins
from the head's namespace. Nothing of the cluster listens in the machine's own namespace. Where
network namespaces cannot be made (not root, no iproute2) the test is skipped with the reason.
Synthetic genome-only children (no engine) keep it light: each node offers one CPU, the head none.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cycleqd.evolve.cluster import LoopbackCluster, netns_available

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _listening_pids() -> set[int]:
    """PIDs of every process with a listening TCP socket (`ss -ltnp`)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def _name(node: dict) -> str:
    """The cluster's own name of a Ray node (its custom resource ``node<i>``)."""
    return next(r for r in node["Resources"] if re.fullmatch(r"node\d+", r))


def _children(run: Path) -> list[dict]:
    f = run / "children.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def _namespaces() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


@pytest.fixture
def cluster(tmp_path_factory):
    """Head (0 CPUs) + 3 nodes (1 CPU each), each in its own network namespace; afterwards nothing of it
    listens any more (`ss -ltnp`, in the machine's namespace and in each of the cluster's), and every
    namespace it made (with its veths and bridge) is deleted."""
    why = netns_available()
    if why is not None:
        pytest.skip(f"network namespaces unavailable here: {why}")
    c = LoopbackCluster(Path("/tmp") / f"cq{os.getpid()}", head_cpus=0, node_cpus=(1, 1, 1), netns=True)
    try:
        c.start()
        yield c
    finally:
        _end_drivers()
        pids = set(c.pids())
        c.stop(grace=3)
        try:
            assert not set(c.pids())
            assert not pids & _listening_pids(), "a process of the cluster still listens"
            assert c.listening() == [], "something still listens in the cluster's namespaces"
        finally:  # the namespaces go even when a check above fails
            c.remove_files()
        assert not set(c.namespaces) & _namespaces(), "a network namespace of the cluster is left"


def _config(tmp_path: Path, generations: int, latency: float) -> Path:
    data = yaml.safe_load((ROOT / "experiments" / "dry_run.yaml").read_text())
    for t in data["tasks"]:
        t["options"]["latency_s"] = latency
    data["evolution"].update(generations=generations, workers=3, worker_cpus=1, final_merge=False)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


_DRIVERS: list[subprocess.Popen] = []  # the drivers a test started, ended before its cluster stops


def _end_drivers() -> None:
    """A test that fails mid-run leaves no driver behind (it would hold a port in a node's namespace)."""
    while _DRIVERS:
        proc = _DRIVERS.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _cycleqd(cluster, *args: str, log: Path) -> subprocess.Popen:
    """``cycleqd -q ARGS --address CLUSTER`` in its own session, stderr to ``log``."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(cluster.command([str(BIN / "cycleqd"), "-q", *args, "--address", cluster.address]),
                                cwd=ROOT,
                                env=cluster.env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    _DRIVERS.append(proc)
    return proc


def _wait_until(done, what: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, f"the driver exited {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"not {what} after {timeout}s"
        time.sleep(0.2)


def _wait_children(run: Path, n: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    _wait_until(lambda: len(_children(run)) >= n, f"{n} children", proc, timeout)


def test_node_lost_mid_run_then_back_and_driver_killed_and_resumed(cluster, tmp_path):
    """Workers run on all three nodes; a node's raylet SIGKILLed by PID mid-run: the run goes on and
    finishes, every child id once, nothing finished lost; the node started again gets workers again;
    a SIGKILLed driver resumes on the same cluster."""
    run, gens = tmp_path / "run", 150  # enough that the run is still going when the restarted node joins
    cfg = _config(tmp_path, gens, latency=0.3)
    nodes = cluster.alive_nodes()
    ids = {n["NodeID"]: _name(n) for n in nodes}
    # every node has an address of its own, none of them the machine's; nothing listens outside the namespaces
    assert sorted(n["NodeManagerAddress"] for n in nodes) == sorted(node.ip for node in cluster.nodes)
    assert len({node.ip for node in cluster.nodes}) == 4 and all(n.ip.startswith("10.77.") for n in cluster.nodes)
    assert not set(cluster.pids()) & _listening_pids()

    log = tmp_path / "driver.log"
    proc = _cycleqd(cluster, "evolve", "--config", str(cfg), "--run-dir", str(run), log=log)
    _wait_children(run, 12, proc)
    # placement: the workers are spread over the three nodes, one each
    assert {ids[c["node"]] for c in _children(run)} == {"node1", "node2", "node3"}
    before = {c["id"] for c in _children(run)}
    cluster.kill_raylet(2)
    assert cluster.nodes[2].netns not in _namespaces()  # the lost node's address went with it
    _wait_children(run, 24, proc)
    after_loss = _children(run)[len(before):]
    assert {ids.get(c["node"]) for c in after_loss[-6:]} <= {"node1", "node3"}  # the others carry on

    cluster.restart(2)
    ids.update({n["NodeID"]: _name(n) for n in cluster.alive_nodes()})
    # the restarted node takes a worker again (the actor that waited for a CPU is placed on it)
    _wait_until(lambda: "node2" in {ids.get(c["node"]) for c in _children(run)[24:]}, "a child on the restarted node",
                proc)
    # the driver, SIGKILLed mid-run, then resumed on the same cluster
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = _children(run)
    res = _cycleqd(cluster, "resume", str(run), log=log)
    assert res.wait(timeout=600) == 0, log.read_text()[-2000:]

    children = _children(run)
    assert len(children) == gens
    assert len({c["id"] for c in children}) == gens  # every child id exactly once
    assert children[:len(kept)] == kept  # nothing finished was lost or rewritten
    assert all(c["error"] is None for c in children)
    assert all((run / "genomes" / f"{c['id']}.safetensors").is_file() for c in children)
    assert "node2" in {ids.get(c["node"]) for c in children[24:]}  # the restarted node took workers again
    assert not set(cluster.pids()) & _listening_pids()  # the driver's and workers' listeners too stayed inside
