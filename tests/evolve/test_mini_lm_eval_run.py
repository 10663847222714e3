"""experiments/mini_lm_eval.yaml (its shell axis a `kind: lm_eval` task) through the CLI on the small
mini world: SIGKILL mid-run, `cycleqd resume`; nothing lost, the lm-eval axis scored for every child."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from mini_run import mini_config_data
from run_helpers import cli_env, evolve_until_then_kill

from cycleqd.runs.store import RunStore

GENERATIONS = 4
REPO = Path(__file__).parents[2]


def _config(root: Path, world: Path) -> Path:
    """experiments/mini_lm_eval.yaml as written, its models the small world's and 6 items per task."""
    data = mini_config_data(world, "small", 6, REPO / "experiments" / "mini_lm_eval.yaml")
    for t in data["tasks"]:
        if t["kind"] == "lm_eval":
            t["data"] = str(REPO / t["data"])
    data["evolution"]["final_merge"] = False
    data["prepare_cache"] = str(root / "prepare")
    path = root / "mini_lm_eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _show(run: Path) -> dict:
    """``cycleqd show RUN --json`` in this process (no Ray)."""
    import contextlib
    import io

    from cycleqd.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["show", str(run), "--json"]) == 0
    return json.loads(buf.getvalue())


def test_mini_lm_eval_killed_and_resumed_loses_nothing(small_world, tmp_path):
    """The example config has an lm-eval axis; `cycleqd evolve --tasks sql,shell --generations 4
    --workers 1` is SIGKILLed after 2 children and `cycleqd resume` finishes it: children 1..4 each
    once, the ones logged before the kill unchanged, every child scored on both axes (the lm-eval
    one with its truncation share), and every elite the run had before the kill still held or beaten."""
    cfg, run = _config(tmp_path, small_world), tmp_path / "run"
    lm_axis = [t["name"] for t in yaml.safe_load(cfg.read_text())["tasks"] if t["kind"] == "lm_eval"]
    assert lm_axis == ["shell"]
    evolve_until_then_kill(["evolve", "--config", str(cfg), "--run-dir", str(run), "--tasks", "sql,shell",
                            "--generations", str(GENERATIONS), "--workers", "1"], run, 2, env=cli_env(), cwd=REPO)
    before = RunStore(run).children()
    assert 2 <= len(before) < GENERATIONS
    before_show = _show(run)

    res = subprocess.run([sys.executable, "-m", "cycleqd.cli", "-q", "resume", str(run), "--in-process"],
                         capture_output=True, text=True, env=cli_env(), timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    children = RunStore(run).children()
    assert [c.generation for c in children] == list(range(1, GENERATIONS + 1))  # nothing lost, nothing twice
    assert children[:len(before)] == before
    for c in children:
        assert c.ok, c
        assert set(c.scores) == {"sql", "shell"} and 0.0 <= c.scores["shell"] <= 1.0
        assert "shell" in c.truncated  # the lm-eval axis reports its truncation share too
    after = _show(run)
    for task, arch in before_show["archives"].items():
        kept = {tuple(e["cell"]): e["quality"] for e in after["archives"][task]["elites"]}
        assert all(kept.get(tuple(e["cell"]), -1) >= e["quality"] for e in arch["elites"])
