"""Recorded episodes, `cycleqd trajectories` (ShareGPT JSONL) and the mini trainer reading it back."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from cycleqd.config import SandboxConfig
from cycleqd.runs.folder import RunFolder
from cycleqd.runs.store import RunStore


def _cycleqd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "cycleqd.cli", "-q", *args], capture_output=True, text=True,
                          env=env, timeout=900)


def _task(name: str, n: int = 12):
    from cycleqd.registry import TASKS

    return TASKS.get(f"mini_{name}")(name=name, sandbox=SandboxConfig(allow_code_execution=True), split="val", n=n)


def test_only_elites_passing_conversations_are_recorded(mini_run):
    store = RunStore(mini_run)
    folder = RunFolder(mini_run)
    kept = {p.stem for p in (mini_run / "episodes").iterdir()}
    seeds = {s["genome"] for s in folder.seeds.values()}
    entered = {c.id for c in folder.children if c.inserted}
    assert seeds <= kept and kept == seeds | entered
    assert not any(p.stem in {c.id for c in folder.children if not c.inserted} for p in (mini_run / "episodes").iterdir())
    tasks = {t: _task(t) for t in ("code", "sql", "shell")}
    for gid in kept:
        episodes = store.episodes(gid)
        by_task: dict[str, list] = {}
        for e in episodes:
            assert e["score"] == 1.0 and e["kind"] == f"mini_{e['task']}"
            assert [m["role"] for m in e["conversation"]] == ["user", "assistant"]
            by_task.setdefault(e["task"], []).append(e)
        for name, eps in by_task.items():  # what was kept passes the task's own check again
            t = tasks[name]
            items = [t._by_id[e["id"]] for e in eps]
            assert [it.prompt for it in items] == [e["conversation"][0]["content"] for e in eps]
            assert all(s.score == 1.0 for s in t.score_outputs(items, [e["conversation"][1]["content"] for e in eps]))
        scores = next(c.scores for c in folder.children if c.id == gid) if gid not in seeds else \
            next(s["scores"] for s in folder.seeds.values() if s["genome"] == gid)
        for name in ("code", "sql", "shell"):  # every solved item, no more
            assert len(by_task.get(name, [])) == round(scores[name] * 12)


@pytest.fixture(scope="module")
def harvested(mini_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("traj") / "traj.jsonl"
    res = _cycleqd("trajectories", str(mini_run), "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    return out, res.stdout


def test_trajectories_are_sharegpt_lines_from_the_elites(mini_run, harvested):
    out, stdout = harvested
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    elites = {e["genome"]: e for e in RunFolder(mini_run).best_by_mean()}
    assert rows and f"{len(rows)} trajectories" in stdout
    assert len({(r["task"], r["sample_id"]) for r in rows}) == len(rows)  # one line per solved item
    for r in rows:
        assert set(r) >= {"id", "task", "kind", "sample_id", "model", "score", "elite", "conversations"}
        assert [t["from"] for t in r["conversations"]] == ["human", "gpt"]
        assert r["model"] in elites and r["elite"]["scores"] == elites[r["model"]]["scores"]
        # the best elite on that task among those that solved it
        solvers = [g for g in elites if any(e["id"] == r["sample_id"] and e["task"] == r["task"]
                                            for e in RunStore(mini_run).episodes(g) or [])]
        assert elites[r["model"]]["scores"][r["task"]] == max(elites[g]["scores"][r["task"]] for g in solvers)


def test_the_mini_trainer_reads_the_trajectories(harvested, tmp_path):
    from cycleqd.mini.finetune import read_trajectories

    out, _ = harvested
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    items = read_trajectories(out, "code")
    code_rows = [r for r in rows if r["kind"] == "mini_code"]
    assert len(items) == len(code_rows) > 0
    assert [(it.prompt, it.answer) for it in items] == [(r["conversations"][0]["value"], r["conversations"][1]["value"])
                                                        for r in code_rows]
    assert all(it.text == it.prompt + it.answer + "\n" for it in items)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"kind": "mini_code", "conversations": [{"from": "gpt", "value": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="one human turn"):
        read_trajectories(bad, "code")
    with pytest.raises(ValueError, match="no trajectories of mini skill"):
        read_trajectories(out, "regex")


def test_mini_finetune_trains_a_fresh_expert_and_scores_it(harvested, small_world, tmp_path):
    out, _ = harvested
    model = tmp_path / "ft"
    res = _cycleqd("mini", "finetune", "--trajectories", str(out), "--skill", "sql", "--out", str(model),
                   "--dir", str(small_world), "--steps", "3", "--test-n", "6")
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads((model / "finetune.json").read_text())
    assert rec["skill"] == "sql" and rec["train"]["steps"] == 3 and rec["items"] > 0
    assert set(rec["test"]["finetuned"]) == {"code", "sql", "shell"} and "expert_sql" in rec["test"]
    assert (model / "config.json").is_file() and "original expert" in res.stdout
    res = _cycleqd("mini", "finetune", "--trajectories", str(out), "--skill", "sql", "--out", str(model),
                   "--dir", str(small_world))
    assert res.returncode == 2 and "not an empty folder" in res.stderr


def test_a_run_without_recordings_is_evaluated_again_unless_recorded_only(tiny_mini_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_mini_run, run)
    shutil.rmtree(run / "episodes")
    res = _cycleqd("trajectories", str(run), "--out", str(tmp_path / "t.jsonl"), "--recorded-only")
    assert res.returncode == 2 and "recorded no episodes" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t.jsonl").exists()
    res = _cycleqd("trajectories", str(run), "--out", str(tmp_path / "t.jsonl"), "--recorded-only", "--split", "val")
    assert res.returncode == 2 and "--recorded-only" in res.stderr
    elites = len(RunFolder(run).best_by_mean())
    for extra in ([], ["--regenerate"]):  # the default evaluates the elites that recorded nothing
        res = _cycleqd("trajectories", str(run), "--out", str(tmp_path / "t.jsonl"), *extra)
        assert res.returncode == 0, res.stderr[-2000:]
        assert f"from {elites} elites (0 recorded, {elites} regenerated)" in res.stdout
        assert (tmp_path / "t.jsonl").read_text() == ""  # the tiny world's models solve nothing


@pytest.mark.parametrize("key,value", [("record_episodes", "sometimes"), ("record_episode", True)])
def test_the_recording_switch_is_validated(key, value):
    import yaml

    from cycleqd.config import ConfigError, parse_config

    data = yaml.safe_load(open("experiments/mini.yaml"))
    assert parse_config(data).evolution.record_episodes is False  # off by default
    data["evolution"][key] = value
    with pytest.raises(ConfigError, match="record_episode"):
        parse_config(data)
