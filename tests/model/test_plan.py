"""The memory plan: from headers and config.json only, placements, refusals with exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cycleqd.config import ConfigError, parse_config
from cycleqd.model.factors import Factors
from cycleqd.model.plan import arch_shapes, check_plan, factors_device, memory_plan

ROOT = Path(__file__).resolve().parents[2]
LLAMA3 = ROOT / "experiments" / "arch" / "Meta-Llama-3-8B-Instruct.config.json"
PAPER = ROOT / "experiments" / "paper_llama3_8b.yaml"
GB = 10**9


def _cfg(family, rank=None, **extra):
    data = {
        "models": {"base": str(family["base"]), "experts": {t: str(family[t]) for t in "abc"}},
        "tasks": [{"name": t, "kind": "likelihood", "data": "x"} for t in "abc"],
        "evolution": {"workers": 1, "mutation": {"rank": rank}},
        "engine": {"name": "transformers", "device": "cpu"},
        **extra,
    }
    return parse_config(data)


@pytest.mark.parametrize("rank", [None, 3])
def test_plan_equals_resident_bytes(tiny_family, tmp_path, rank):
    """base, task vectors and factors as planned from headers are the bytes Factors holds."""
    cfg = _cfg(tiny_family, rank, prepare_cache=str(tmp_path))
    plan = {i.what: i.bytes for i in memory_plan(cfg).items}
    f = Factors.prepare(cfg, progress=False)
    size = lambda g: sum(t.numel() * t.element_size() for t in g.values())  # noqa: E731
    assert plan["base"] == size(f.base)
    assert plan["task vectors"] == size(f.tau)
    assert plan[f"svd factors (rank {rank or 'full'})"] == size(f.U) + size(f.S) + size(f.Vt)


def test_arch_shapes_match_the_files(tiny_family):
    from cycleqd.model.experts import inspect_model

    info = inspect_model(tiny_family["base"])
    assert arch_shapes(info.config) == info.shapes


def _paper_plan(rank, **kw):
    from cycleqd.config import load_config

    data = load_config(PAPER, check_paths=False).model_dump()
    data["evolution"]["mutation"]["rank"] = rank
    return memory_plan(parse_config(data), arch=str(LLAMA3), **kw)


def test_llama3_8b_figures():
    """3 Llama-3-8B experts in bf16: 16 GB base, 48 GB task vectors; full rank stores one side only."""
    plan = {i.what: i.bytes for i in _paper_plan(None, device_bytes=80 * GB, host_bytes=1000 * GB).items}
    assert plan["base"] == 8_030_261_248 * 2
    assert plan["task vectors"] == 3 * plan["base"]
    assert 16 * GB < plan["svd factors (rank full)"] < 17 * GB  # not the 67 GB of U and V both
    assert _paper_plan(64, device_bytes=80 * GB, host_bytes=1000 * GB).items[2].bytes < 1.2 * GB


def test_auto_placement_falls_back_to_host():
    big = _paper_plan(None, device_bytes=141 * GB, host_bytes=1000 * GB)
    small = _paper_plan(None, device_bytes=80 * GB, host_bytes=1000 * GB)
    assert big.fits and big.factors_device == "cuda"
    assert small.fits and small.factors_device == "cpu"
    nope = _paper_plan(None, device_bytes=80 * GB, host_bytes=64 * GB)
    assert not nope.fits and "host memory" in nope.problem


def test_factors_device_on_cpu_engine(tiny_family):
    cfg = _cfg(tiny_family)
    assert factors_device(cfg, "cpu") == "cpu"
    assert factors_device(_cfg(tiny_family, factors={"device": "cpu"}), "cuda:0") == "cpu"


def test_hub_base_needs_an_architecture():
    from cycleqd.config import load_config

    cfg = load_config(PAPER, check_paths=False)
    with pytest.raises(ConfigError, match="--arch"):
        memory_plan(cfg)
    with pytest.raises(ConfigError, match="does not fit"):
        check_plan(cfg, arch=str(LLAMA3), device_bytes=80 * GB, host_bytes=32 * GB)


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "cycleqd.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_plan_command_offline_json_and_refusal():
    ok = _cli("plan", "--config", str(PAPER), "--arch", str(LLAMA3), "--device-memory", "141GB",
              "--host-memory", "512GB", "--json")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["fits"] and out["per_worker"]["base"]["bytes"] == 8_030_261_248 * 2
    bad = _cli("plan", "--config", str(PAPER), "--arch", str(LLAMA3), "--device-memory", "80GB",
               "--host-memory", "64GB")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "does not fit" in bad.stderr


def test_evolve_refuses_workers_the_machine_cannot_hold(tiny_family, tmp_path):
    """--workers 1000: exit 2 in seconds, one line, before Ray starts, nothing written."""
    cfg = {
        "models": {"base": str(tiny_family["base"]), "experts": {t: str(tiny_family[t]) for t in "abc"}},
        "tasks": [{"name": t, "kind": "likelihood", "data": str(tmp_path / "t.txt")} for t in "abc"],
        "prepare_cache": str(tmp_path / "cache"),
    }
    (tmp_path / "t.txt").write_text("hello\n")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    t0 = time.time()
    res = _cli("evolve", "--config", str(path), "--workers", "1000", "--run-dir", str(run), cwd=tmp_path)
    assert res.returncode == 2 and time.time() - t0 < 60
    assert len(res.stderr.strip().splitlines()) == 1 and "--workers" in res.stderr
    assert not run.exists() and not (tmp_path / "cache").exists() and not (tmp_path / "archives").exists()
