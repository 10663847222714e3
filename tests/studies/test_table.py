"""The table's protocol: what evolution sees, what chooses models, and what scores them never overlap."""
from __future__ import annotations

import pytest

from cycleqd.config import load_config, split_config
from cycleqd.registry import TASKS
from cycleqd.studies.table import SEARCH_VARIANTS, _row, selection_config, variant_config

MINI = "experiments/mini.yaml"


def _prompts(cfg) -> dict[str, list[str]]:
    out = {}
    for t in cfg.tasks:
        task = TASKS.get(t.kind)(name=t.name, data=None, **t.options)
        out[t.name] = [it.prompt for it in task.items]
    return out


def test_selection_items_are_unseen_by_evolution_and_test_is_apart():
    cfg = load_config(MINI)
    evolve = _prompts(variant_config(cfg, "cycleqd", 0, None, evolve_n=40))
    select = _prompts(selection_config(variant_config(cfg, "cycleqd", 0, None, evolve_n=40), 60))
    test = _prompts(split_config(cfg, "test", 50))
    for name in cfg.task_names:
        assert len(evolve[name]) == 40 and len(select[name]) == 60 and len(test[name]) == 50
        assert not set(evolve[name]) & set(select[name]), name
        assert not (set(evolve[name]) | set(select[name])) & set(test[name]), name


def test_variants_change_only_their_operator():
    cfg = load_config(MINI)
    base = variant_config(cfg, "cycleqd", 2, 7, evolve_n=40)
    assert base.seed == 2 and base.evolution.generations == 7
    assert all(t.options["split"] == "val" and t.options["n"] == 40 for t in base.tasks)
    fixed = variant_config(cfg, "fixed_axes", 2, 7, evolve_n=40)
    assert fixed.evolution.fixed_quality_task == cfg.task_names[0]
    gauss = variant_config(cfg, "gaussian_mutation", 2, 7, evolve_n=40)
    assert gauss.evolution.mutation.name == "gaussian" and base.evolution.mutation.name == "svd"
    uni = variant_config(cfg, "uniform_sampling", 2, 7, evolve_n=40)
    assert uni.evolution.sampling.name == "uniform" and base.evolution.sampling.name == "elite"
    for v in (fixed, gauss, uni):
        assert v.evolution.crossover == base.evolution.crossover and v.tasks == base.tasks


def test_search_variants_change_only_the_search():
    """cma_es, nsga2 and random rows evolve the same tasks, items and budget as cycleqd; only the search differs."""
    cfg = load_config(MINI)
    base = variant_config(cfg, "cycleqd", 1, 300, evolve_n=100)
    assert base.evolution.search.name == "cycleqd"
    for search in SEARCH_VARIANTS:
        v = variant_config(cfg, search, 1, 300, evolve_n=100)
        assert v.evolution.search.name == search and v.evolution.search.options == {}
        assert v.tasks == base.tasks and v.evolution.generations == 300 and v.seed == 1
        assert v.evolution.model_copy(update={"search": base.evolution.search}) == base.evolution


def test_row_mean_and_std_over_seeds():
    row = _row("x", [{"a": 0.2, "b": 0.4}, {"a": 0.4, "b": 0.6}])
    assert row["mean"] == pytest.approx(0.4) and row["std"] == pytest.approx(0.1414, abs=1e-4)
    assert row["scores"] == pytest.approx({"a": 0.3, "b": 0.5}) and row["seeds"] == 2


def test_selection_needs_the_evolution_sample_size():
    cfg = load_config(MINI)
    data = variant_config(cfg, "cycleqd", 0, None).model_dump()
    del data["tasks"][0]["options"]["n"]
    from cycleqd.config import parse_config

    with pytest.raises(ValueError, match="options.n"):
        selection_config(parse_config(data), 10)


def test_a_run_made_with_other_settings_is_not_resumed(tmp_path):
    from cycleqd.config import ConfigError
    from cycleqd.studies.table import check_same_experiment

    cfg = load_config(MINI)
    wanted = variant_config(cfg, "cycleqd", 0, 60, evolve_n=100)
    check_same_experiment(variant_config(cfg, "cycleqd", 0, 30, evolve_n=100), wanted, tmp_path)  # generations aside
    with pytest.raises(ConfigError, match="n: 50 -> 100"):
        check_same_experiment(variant_config(cfg, "cycleqd", 0, 60, evolve_n=50), wanted, tmp_path)
    with pytest.raises(ConfigError, match="sampling"):
        check_same_experiment(variant_config(cfg, "uniform_sampling", 0, 60, evolve_n=100), wanted, tmp_path)


def test_paired_interval():
    import random

    from cycleqd.studies.table import conclusion, paired_interval

    rng = random.Random(0)
    ta = {t: [float(rng.random() < 0.6) for _ in range(300)] for t in ("code", "sql", "shell")}
    same = paired_interval([ta, ta], ta)
    assert same["mean"] == 0.0 and same["interval"] == [0.0, 0.0]
    # better on every 10th item of every task, in every seed: +0.1 exactly, and clearly above 0
    up = {t: [1.0 if i % 10 == 0 else v for i, v in enumerate(vals)] for t, vals in ta.items()}
    gain = {t: sum(a - b for a, b in zip(up[t], ta[t])) / 300 for t in ta}
    better = paired_interval([up, up, up], ta)
    assert better["mean"] == pytest.approx(sum(gain.values()) / 3)
    assert 0 < better["interval"][0] < better["mean"] < better["interval"][1]
    assert conclusion(better["interval"]) == "cycleqd_best better" and conclusion(same["interval"]) == "no difference"
    assert conclusion(paired_interval([ta], up)["interval"], "team_vote") == "task_arithmetic better"
    assert paired_interval([up], ta) == paired_interval([up], ta)  # a fixed bootstrap seed
    # two seeds that disagree average per item: half the gain
    assert paired_interval([up, ta], ta)["mean"] == pytest.approx(better["mean"] / 2)
    with pytest.raises(ValueError):
        paired_interval([{t: v[:10] for t, v in up.items()}], ta)


def test_table_cli_small_with_searches_resumes_run_by_run(tmp_path):
    """`cycleqd table` end to end on the tiny mini world (one seed, 4 children per run), in two
    calls: the first evolves and chooses cycleqd only (--choose-only, no test item); the second
    skips that finished run (not resumed, not chosen again, the merge weights kept), adds nsga2 and
    scores the whole folder: cycleqd and nsga2 rows, NSGA-II's front teams, the budget columns
    (children, worker and wall seconds) and the paired intervals against task arithmetic and CycleQD."""
    import json
    import subprocess
    import sys

    import yaml
    from mini_run import mini_config_data
    from run_helpers import cli_env

    from cycleqd.studies.table import FRONT_TEAM_ROWS, VERSUS_CYCLEQD_KEY, VERSUS_KEY

    data = mini_config_data(tmp_path / "world", "tiny", 4)
    data["evolution"].update(workers=1, final_merge=False)
    data["prepare_cache"] = str(tmp_path / "prepare")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(data))
    models, runs, out = tmp_path / "models", tmp_path / "runs", tmp_path / "table.json"

    def table(*extra: str) -> str:
        argv = [sys.executable, "-m", "cycleqd.cli", "-q", "table", "--config", str(tmp_path / "t.yaml"),
                "--models", str(models), "--out", str(out), "--runs-root", str(runs), "--seeds", "1",
                "--generations", "4", "--evolve-n", "4", "--select-n", "3", "--test-n", "5",
                "--scores-cache", str(tmp_path / "scores"), "--in-process", *extra]
        res = subprocess.run(argv, capture_output=True, text=True, env=cli_env(), timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout

    assert "cycleqd seed 0: chose" in table("--choose-only", "--variants", "cycleqd")
    assert not out.exists()  # nothing scored on test
    weights = json.loads((models / "models.json").read_text())["merges"]
    log = (runs / "cycleqd-s0" / "children.jsonl").stat().st_mtime_ns

    second = table("--variants", "cycleqd,nsga2")
    assert "cycleqd seed 0: chose" not in second and "nsga2 seed 0: chose" in second
    assert (runs / "cycleqd-s0" / "children.jsonl").stat().st_mtime_ns == log  # not resumed
    assert json.loads((models / "models.json").read_text())["merges"] == weights
    t = json.loads(out.read_text())
    rows = {r["model"]: r for r in t["rows"]}
    assert {"cycleqd_best", "nsga2_best", "team_router", "team_vote", *FRONT_TEAM_ROWS.values()} <= set(rows)
    assert t["test_n"] == 5 and t[VERSUS_KEY]["nsga2_best"]["conclusion"]
    for name in ("cycleqd_best", "nsga2_best"):
        assert rows[name]["children"] == 4 and rows[name]["wall_seconds"] > rows[name]["child_seconds"] / 2 > 0
    assert set(t[VERSUS_CYCLEQD_KEY]) == {"nsga2_best", *FRONT_TEAM_ROWS.values()}
    assert t[VERSUS_CYCLEQD_KEY]["nsga2_team_vote"]["rival"] == "team_vote"
    assert {"nsga2_best", "nsga2_team_router"} <= set(t[VERSUS_KEY])
    record = json.loads((models / "runs" / "nsga2-s0.json").read_text())
    assert record["chosen"] in {s["genome"] for s in record["shortlist"]}
    assert all(len(v) == 3 for s in record["shortlist"] for v in s["selection_items"].values())
    kept = [json.loads(f.read_text()) for f in (tmp_path / "scores").glob("*.json")]  # per-model test scores
    assert len(kept) >= 8 and all(len(v) == 5 for k in kept for v in k.values())  # (equal genomes share one)


def test_score_cache_keeps_scores_per_model_and_draw(tmp_path):
    """A model's test scores are computed once per draw and world; another model, draw or world is scored."""
    from cycleqd.studies.table import ScoreCache

    calls = []

    def score(v):
        return lambda: calls.append(v) or {"code": [v, 1.0]}

    world = {"base": "a"}
    first = ScoreCache(tmp_path, world, 0, 2)
    assert first.get(b"model", score(0.0)) == {"code": [0.0, 1.0]}
    assert ScoreCache(tmp_path, world, 0, 2).get(b"model", score(0.5)) == {"code": [0.0, 1.0]}  # kept
    assert first.get(b"other", score(0.25)) == {"code": [0.25, 1.0]}
    assert ScoreCache(tmp_path, world, 1, 2).get(b"model", score(0.75))["code"][0] == 0.75  # another draw
    assert ScoreCache(tmp_path, {"base": "b"}, 0, 2).get(b"model", score(1.0))["code"][0] == 1.0  # another world
    assert ScoreCache(None, world, 0, 2).get(b"model", score(0.5))["code"][0] == 0.5  # no folder: nothing kept
    assert calls == [0.0, 0.25, 0.75, 1.0, 0.5]
