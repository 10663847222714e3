"""Scaling out: join an existing Ray cluster (--address) and run as a Ray job (`make submit`)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from cycleqd.evolve.cluster import session_pids, stop_sessions

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_head(tmp: Path, env: dict) -> tuple[subprocess.Popen, int, int]:
    """`ray start --head --block` with every listener on its own free port (another Ray on this
    machine, a user's run or a test's, holds the defaults); (process, GCS port, dashboard port)."""
    gcs, dash = _free_port(), _free_port()
    extra = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    with open(tmp / "head.err", "ab") as err:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=2",
             "--disable-usage-stats", f"--temp-dir={tmp}", *extra],
            env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )
    return proc, gcs, dash


def _head_takes_jobs(proc: subprocess.Popen, dash: int, env: dict, deadline: float) -> bool:
    """Whether the head's dashboard answers and its job agent runs a trivial job before ``deadline``."""
    import urllib.request

    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    # the job agent registers a little after the dashboard answers
    while time.time() < deadline and proc.poll() is None:
        if subprocess.run([str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--", "true"],
                          env=env, capture_output=True, timeout=60).returncode == 0:
            return True
        time.sleep(1)
    return False


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on loopback in its own process group, stopped by its PID. A head that
    exits or does not take a job within its time (a loaded machine starts Ray slowly) is started once more."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    # Ray's session folder under a short root: its socket paths must fit in 107 bytes, and pytest's own
    # folders grow longer under xdist (popen-gw0/...)
    tmp = Path(tempfile.mkdtemp(prefix="cqray", dir="/tmp"))
    for _ in range(2):
        proc, gcs, dash = _start_head(tmp, env)
        if _head_takes_jobs(proc, dash, env, time.time() + 180):
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    else:
        pytest.fail("ray head did not come up: " + (tmp / "head.err").read_text()[-1500:])
    yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    # SIGTERM, then SIGKILL to what is left after 3 s (`ray start --block` stops its processes one by one, ~30 s)
    stop_sessions([proc], grace=3)
    shutil.rmtree(tmp, ignore_errors=True)
    assert not session_pids(proc.pid), "a process of the Ray head is left"


@pytest.fixture(scope="module")
def small_config(tiny_family, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clustercfg")
    (d / "t.txt").write_text("abc def\nfoo bar\n")
    cfg = {
        "name": "cluster",
        "models": {"base": str(tiny_family["base"]), "experts": {t: str(tiny_family[t]) for t in "abc"}},
        "tasks": [{"name": t, "kind": "likelihood", "data": str(d / "t.txt"), "bins": {"lo": 0.0, "hi": 0.05}}
                  for t in "abc"],
        "evolution": {"generations": 4, "workers": 2},
        "prepare_cache": str(d / "cache"),
    }
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    return d / "c.yaml"


def _children(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "children.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_evolve_joins_an_existing_cluster(ray_head, small_config, tmp_path):
    run = tmp_path / "run"
    out = subprocess.run(
        [str(BIN / "cycleqd"), "-q", "evolve", "--config", str(small_config), "--run-dir", str(run),
         "--address", ray_head["gcs"]],
        env=ray_head["env"], capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-1500:]
    assert len(_children(run)) == 4
    # the workers ran in the cluster's own session folder, not a new local Ray
    assert not any("Started a local Ray instance" in line for line in out.stderr.splitlines())


@pytest.mark.slow
def test_make_submit_runs_the_job_through_ray_job_submit(ray_head, small_config, tmp_path):
    run = tmp_path / "job"
    out = subprocess.run(
        ["make", "-s", "submit", f"EXP={small_config}", "GENERATIONS=3", "WORKERS=1", f"RUN_DIR={run}",
         f"ADDRESS={ray_head['dashboard']}"],
        cwd=ROOT, env=ray_head["env"], capture_output=True, text=True, timeout=400,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-1500:]
    assert "succeeded" in out.stdout + out.stderr
    assert len(_children(run)) == 3
