"""The table's models folder: made once, re-scored on fresh test draws, refused on another world."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mini_run import mini_config_data

from cycleqd.config import load_config
from cycleqd.studies.table import INTERVAL_KEY, MODELS_FILE, VERSUS_KEY, make_table, read_models


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A table over a tiny mini world (built here), one CycleQD seed of 2 children."""
    d = tmp_path_factory.mktemp("table")
    world = d / "world"
    cfg = mini_config_data(world, "tiny", 4)
    cfg["evolution"]["workers"] = 1
    cfg["prepare_cache"] = str(d / "prepare")
    path = d / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = d / "results" / "table.json"
    make_table(load_config(path, check_paths=False), out, models_dir=d / "models", seeds=1, generations=2,
               runs_root=d / "runs", test_n=6, variants=["cycleqd"], select_n=3)
    return {"dir": d, "world": world, "out": out, "models": d / "models"}


def _rescore(models: Path, out: Path, seed: int, *more: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cycleqd.cli", "table", "--rescore", "--models", str(models),
                           "--test-seed", str(seed), "--test-n", "6", "--out", str(out), *more],
                          capture_output=True, text=True, timeout=600)


def test_models_folder_holds_every_row(made):
    table = json.loads(made["out"].read_text())
    manifest = read_models(made["models"])
    assert [r["model"] for r in table["rows"]] == ["base", "expert_code", "expert_sql", "expert_shell",
                                                   "task_arithmetic", "ties", "cycleqd_best", "cycleqd_merged",
                                                   "team_router", "team_router_nll", "team_vote", "team_moa"]
    for files in manifest["rows"].values():
        for f in files:
            assert (made["models"] / f).stat().st_size < 64_000  # genomes, not checkpoints
    for row, variant in (("team_router", "router_task"), ("team_router_nll", "router_nll"), ("team_vote", "vote"),
                         ("team_moa", "moa")):
        (f,) = manifest["rows"][row]
        team = json.loads((made["models"] / f).read_text())
        assert team["variant"] == variant and team["team"]["tasks"] == ["code", "sql", "shell"]
        for m in team["team"]["members"]:  # the members' genomes travel with the models folder
            assert (made["models"] / team["dir"] / f"{m['genome']}.safetensors").stat().st_size < 64_000
    scored = {r["model"]: r for r in table["rows"]}
    assert all(set(scored[r]["scores"]) == {"code", "sql", "shell"} and scored[r]["seeds"] == 1
               for r in ("team_router", "team_vote", "team_moa"))
    assert set(manifest["merges"]) == {"task_arithmetic", "ties"}
    lo, hi = table[INTERVAL_KEY]["interval"]
    assert lo <= table[INTERVAL_KEY]["mean"] <= hi and table[INTERVAL_KEY]["items_per_task"]["code"] == 6
    assert table[INTERVAL_KEY]["conclusion"] in ("cycleqd_best better", "task_arithmetic better", "no difference")
    assert set(table[VERSUS_KEY]) == set(manifest["rows"]) - {"cycleqd_best"}


def test_rescore_writes_the_same_schema_on_a_fresh_draw(made):
    out = made["dir"] / "rescored.json"
    res = _rescore(made["models"], out, 3, "--against", str(made["out"]))
    assert res.returncode == 0, res.stderr[-2000:]
    first, again = json.loads(made["out"].read_text()), json.loads(out.read_text())
    assert set(first) == set(again) - {"replication"} and again["test_seed"] == 3 and first["test_seed"] == 0
    # every conclusion of the first draw beside this one's, as `make table-rescore` prints it
    rep = again["replication"]
    assert rep["against"] == str(made["out"]) and (rep["reference_test_seed"], rep["other_test_seed"]) == (0, 3)
    assert set(rep["comparisons"]) == {"cycleqd_best - task_arithmetic"} | {f"{r} - task_arithmetic"
                                                                            for r in first[VERSUS_KEY]}
    for name, r in rep["comparisons"].items():
        assert r["same"] == (r["reference"] == r["other"]) and 0.0 <= r["chance_same"] <= 1.0
    assert "conclusions on test seed 3 against seed 0 (6 items per task)" in res.stdout
    assert [r["model"] for r in first["rows"]] == [r["model"] for r in again["rows"]]
    assert set(again[INTERVAL_KEY]) == set(first[INTERVAL_KEY])


def test_rescore_refuses_another_world(made):
    other = made["dir"] / "other_models"
    shutil.copytree(made["models"], other)
    manifest = json.loads((other / MODELS_FILE).read_text())
    manifest["world"]["expert_sql"] = "0" * 16
    (other / MODELS_FILE).write_text(json.dumps(manifest))
    out = made["dir"] / "refused.json"
    res = _rescore(other, out, 1)
    assert res.returncode == 2 and "expert_sql" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_rescore_rebuilds_an_absent_world(made):
    shutil.rmtree(made["world"])
    out = made["dir"] / "rebuilt.json"
    res = _rescore(made["models"], out, 0)
    assert res.returncode == 0, res.stderr[-2000:]
    # the rebuilt world is the same world: same fingerprints, and the same scores on the same draw
    assert json.loads(out.read_text())["rows"] == json.loads(made["out"].read_text())["rows"]
