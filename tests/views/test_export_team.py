"""`cycleqd export RUN --team team.json`: one standard model folder per member, team.json and a README."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from run_helpers import SLOW_GENOME_COPY


def _cycleqd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "cycleqd.cli", "-q", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def team_file(tiny_mini_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("team") / "vote"
    res = _cycleqd("team", str(tiny_mini_run), "--strategy", "vote", "--size", "2", "--out", str(out),
                   "--split", "test", "--n", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    return out / "team.json"


def test_export_team_writes_a_model_per_member(tiny_mini_run, team_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from cycleqd.model.factors import Factors
    from cycleqd.model.genome import Genome, materialize
    from cycleqd.runs.store import RunStore

    out = tmp_path / "export"
    res = _cycleqd("export", str(tiny_mini_run), "--team", str(team_file), "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    team = json.loads((out / "team.json").read_text())
    made = json.loads(team_file.read_text())
    assert [m["genome"] for m in team["members"]] == [m["genome"] for m in made["members"]]
    assert team["scores"] == made["scores"] and team["plan"] == made["plan"]
    readme = (out / "README.md").read_text()
    assert "How to serve it" in readme and "largest group" in readme
    cfg = RunStore(tiny_mini_run).config()
    factors = Factors.prepare(cfg, device="cpu", progress=False)
    for m in team["members"]:
        folder = out / m["folder"]
        assert (folder / "README.md").is_file() and (folder / "cycleqd" / "genome.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(folder)
        want = materialize(Genome.load(folder / "cycleqd" / "genome.safetensors"), factors)
        got = model.state_dict()
        assert all(torch.equal(got[k], v.to(got[k].dtype)) for k, v in want.items())


def test_export_team_bad_input(tiny_mini_run, team_file, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"strategy": "vote"}))
    for args, message in (([str(bad)], "not a team description"), ([str(tmp_path / "none.json")], "no such file")):
        res = _cycleqd("export", str(tiny_mini_run), "--team", *args, "--out", str(tmp_path / "x"))
        assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "x").exists()



def test_sigterm_during_export_team_leaves_nothing(tiny_mini_run, team_file, tmp_path):
    """A real SIGTERM while `export --team` writes its members: one line, exit 1, no out folder and
    no staging folder left (the team is written to a sibling folder and renamed at the end)."""
    import signal
    import time

    marker, out = tmp_path / "marker", tmp_path / "out"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_GENOME_COPY, str(marker), "-q", "export", str(tiny_mini_run),
                             "--team", str(team_file), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert list(tmp_path.glob(".out.*"))  # the team's staging folder is there when the signal comes
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = [ln for ln in err.splitlines() if ln.strip() and "it/s]" not in ln]  # transformers' progress bars
    assert proc.returncode == 1 and len(lines) == 1 and "stopped by SIGTERM" in lines[0], err[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
