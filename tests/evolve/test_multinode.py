"""A loopback Ray cluster of 4 nodes: workers spread over the nodes, a node lost mid-run, the driver killed.

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

from cycleqd.evolve.cluster import LoopbackCluster

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


@pytest.fixture
def cluster(tmp_path_factory):
    """Head (0 CPUs) + 3 nodes (1 CPU each) on 127.0.0.1; afterwards nothing of it listens any more."""
    c = LoopbackCluster(Path("/tmp") / f"cq{os.getpid()}", head_cpus=0, node_cpus=(1, 1, 1))
    try:
        c.start()
        yield c
    finally:
        pids = set(c.pids())
        c.stop()
        assert not set(c.pids())
        assert not pids & _listening_pids(), "a process of the cluster still listens"
        c.remove_files()


def _config(tmp_path: Path, generations: int, latency: float) -> Path:
    data = yaml.safe_load((ROOT / "experiments" / "dry_run.yaml").read_text())
    for t in data["tasks"]:
        t["options"]["latency_s"] = latency
    data["evolution"].update(generations=generations, workers=3, worker_cpus=1, final_merge=False)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _cycleqd(cluster, *args: str, log: Path) -> subprocess.Popen:
    """``cycleqd -q ARGS --address CLUSTER`` in its own session, stderr to ``log``."""
    with open(log, "ab") as err:
        return subprocess.Popen([str(BIN / "cycleqd"), "-q", *args, "--address", cluster.address], cwd=ROOT,
                                env=cluster.env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def _wait_children(run: Path, n: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while len(_children(run)) < n:
        assert proc.poll() is None, f"the driver exited {proc.returncode}"
        assert time.monotonic() < deadline, f"fewer than {n} children after {timeout}s"
        time.sleep(0.2)


def test_node_lost_mid_run_then_back_and_driver_killed_and_resumed(cluster, tmp_path):
    """Workers run on all three nodes; a node's raylet SIGKILLed by PID mid-run: the run goes on and
    finishes, every child id once, nothing finished lost; the node started again gets workers again;
    a SIGKILLed driver resumes on the same cluster."""
    run, gens = tmp_path / "run", 60
    cfg = _config(tmp_path, gens, latency=0.3)
    ids = {n["NodeID"]: _name(n) for n in cluster.alive_nodes()}

    log = tmp_path / "driver.log"
    proc = _cycleqd(cluster, "evolve", "--config", str(cfg), "--run-dir", str(run), log=log)
    _wait_children(run, 12, proc)
    # placement: the workers are spread over the three nodes, one each
    assert {ids[c["node"]] for c in _children(run)} == {"node1", "node2", "node3"}
    before = {c["id"] for c in _children(run)}
    cluster.kill_raylet(2)
    _wait_children(run, 24, proc)
    after_loss = _children(run)[len(before):]
    assert {ids.get(c["node"]) for c in after_loss[-6:]} <= {"node1", "node3"}  # the others carry on

    cluster.restart(2)
    ids.update({n["NodeID"]: _name(n) for n in cluster.alive_nodes()})
    _wait_children(run, 36, proc)
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
    # the restarted node took workers again
    assert "node2" in {ids.get(c["node"]) for c in children[24:]}
