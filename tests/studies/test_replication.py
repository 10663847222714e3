"""Does a table hold still: its conclusions against another draw's, and how often a fresh draw repeats them."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cycleqd.studies.replication import chance_of_side, compare_tables, items_needed
from cycleqd.studies.table import INTERVAL_KEY, VERSUS_KEY, conclusion, paired_interval

TASKS = ("code", "sql", "shell")


def _draw(rng: np.random.Generator, n: int, gain: float) -> tuple[dict, dict]:
    """Per-item 0/1 scores of a rival (70% right) and of a model that answers 20% of the items afresh
    (right with the chance that makes its expected gain over the rival ``gain``)."""
    rival, ours = {}, {}
    for t in TASKS:
        r = (rng.random(n) < 0.7).astype(float)
        flip = rng.random(n) < 0.2
        # a flipped item is answered afresh, right with the chance that gives the gain
        up = rng.random(n) < 0.7 + gain / 0.2
        o = np.where(flip, np.where(up, 1.0, 0.0), r)
        rival[t], ours[t] = r.tolist(), o.tolist()
    return rival, ours


def _table(rng: np.random.Generator, n: int, gains: dict[str, float], seed: int, resamples: int = 2000) -> dict:
    table: dict = {"test_n": n, "test_seed": seed, "rows": [], VERSUS_KEY: {}}
    for name, gain in gains.items():
        rival, ours = _draw(rng, n, gain)
        d = paired_interval([ours], rival, resamples=resamples, seed=seed)
        if name == "cycleqd_best":
            table[INTERVAL_KEY] = {**d, "conclusion": conclusion(d["interval"])}
        else:
            table[VERSUS_KEY][name] = {"mean": d["mean"], "interval": d["interval"],
                                       "conclusion": conclusion(d["interval"], name)}
    return table


def test_the_chance_of_a_conclusion_is_how_often_real_draws_reach_it():
    """Draws of per-item scores with a known gain, read through the table's own bootstrap interval:
    the share that reads "better" is the chance the normal approximation gives."""
    rng = np.random.default_rng(0)
    n, gain, runs = 600, 0.012, 240
    sides = []
    for k in range(runs):
        rival, ours = _draw(rng, n, gain)
        lo, hi = paired_interval([ours], rival, resamples=1000, seed=k)["interval"]
        sides.append(1 if lo > 0 else -1 if hi < 0 else 0)
    # one draw's standard error of the 3-task mean: per-item difference variance / n / 3 tasks
    p_flip, p_up = 0.2, 0.7 + gain / 0.2
    var_item = p_flip * (p_up * 0.3 + (1 - p_up) * 0.7) - gain**2  # E[d^2] - E[d]^2 (d in {-1, 0, 1})
    se = (var_item / n / 3) ** 0.5
    for side in (1, 0, -1):
        seen = sides.count(side) / runs
        assert abs(seen - chance_of_side(gain, se, side)) < 0.09, (side, seen, chance_of_side(gain, se, side))
    assert 0.2 < sides.count(1) / runs < 0.8  # a gain at the edge: neither always nor never "better"


def test_items_needed_is_where_a_draw_repeats_the_sign_with_975_in_1000():
    for mean, se in ((0.01, 0.005), (-0.004, 0.004), (0.05, 0.006)):
        n = items_needed(mean, se, 1500)
        at = lambda m: chance_of_side(mean, se * (1500 / m) ** 0.5, 1 if mean > 0 else -1)  # noqa: E731
        assert at(n) >= 0.975 > at(n * 0.95)
    assert items_needed(0.0, 0.004, 1500) is None


def test_two_draws_of_the_same_models_line_up_conclusion_by_conclusion():
    rng = np.random.default_rng(1)
    gains = {"cycleqd_best": -0.01, "far_better": 0.05, "tie": 0.0}
    a, b = _table(rng, 1500, gains, 0), _table(rng, 1500, gains, 1)
    rep = compare_tables(a, b)
    rows = rep["comparisons"]
    assert set(rows) == {"cycleqd_best - task_arithmetic", "far_better - task_arithmetic", "tie - task_arithmetic"}
    far = rows["far_better - task_arithmetic"]
    assert far["same"] and far["reference"] == "far_better better" and far["chance_same"] > 0.999
    for name, r in rows.items():
        assert r["same"] == (r["reference"] == r["other"])
        assert (name in rep["flipped"]) == (not r["same"])
    assert rep["chance_all_same"] == pytest.approx(np.prod([r["chance_same"] for r in rows.values()]))
    # a conclusion that reads the other way on the second draw is a flip
    b[VERSUS_KEY]["far_better"] = {"mean": -0.05, "interval": [-0.06, -0.04], "conclusion": "task_arithmetic better"}
    flipped = compare_tables(a, b)
    assert "far_better - task_arithmetic" in flipped["flipped"] and flipped["reversed"] == ["far_better - task_arithmetic"]
    assert all(not r["reversed"] for k, r in rep["comparisons"].items() if k not in rep["flipped"])
    assert flipped["comparisons"]["far_better - task_arithmetic"]["other"] == "task_arithmetic better"


def test_tables_of_other_sizes_or_other_rows_are_refused():
    rng = np.random.default_rng(2)
    a = _table(rng, 300, {"cycleqd_best": 0.0, "x": 0.0}, 0, resamples=200)
    with pytest.raises(ValueError, match="300 and 200 items"):
        compare_tables(a, _table(rng, 200, {"cycleqd_best": 0.0, "x": 0.0}, 1, resamples=200))
    with pytest.raises(ValueError, match="different comparisons: y - task_arithmetic"):
        compare_tables(a, _table(rng, 300, {"cycleqd_best": 0.0, "x": 0.0, "y": 0.0}, 1, resamples=200))


def _cycleqd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cycleqd.cli", *args], capture_output=True, text=True, timeout=120)


def test_table_compare_on_the_command_line(tmp_path):
    rng = np.random.default_rng(3)
    gains = {"cycleqd_best": 0.0, "far_better": 0.05}
    a, b = _table(rng, 600, gains, 0, resamples=500), _table(rng, 600, gains, 1, resamples=500)
    b[VERSUS_KEY]["far_better"] = {"mean": -0.05, "interval": [-0.06, -0.04], "conclusion": "task_arithmetic better"}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = _cycleqd("table", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert out.returncode == 0, out.stderr
    flipped = [ln for ln in out.stdout.splitlines() if "REVERSED" in ln or "FLIPPED" in ln]
    assert len(flipped) == 1 and "REVERSED far_better - task_arithmetic" in flipped[0], out.stdout
    assert "1 of 2 conclusions differ, 1 of them reversed" in out.stdout
    # bad input: one line, exit 2, before anything is scored
    (tmp_path / "junk.json").write_text("{")
    (tmp_path / "small.json").write_text(json.dumps(_table(rng, 300, gains, 2, resamples=200)))
    for args, message in ((("--compare", str(tmp_path / "a.json"), str(tmp_path / "none.json")), "no such table"),
                          (("--compare", str(tmp_path / "a.json"), str(tmp_path / "junk.json")), "not a table JSON"),
                          (("--compare", str(tmp_path / "a.json"), str(tmp_path / "small.json")),
                           "--compare " + str(tmp_path / "a.json") + ": the tables were scored on 600 and 300"),
                          (("--against", str(tmp_path / "a.json")), "needs --rescore"),
                          (("--rescore", "--models", str(tmp_path), "--against", str(tmp_path / "none.json")),
                           "no such table"),
                          (("--rescore", "--models", str(tmp_path), "--against", str(tmp_path / "a.json"),
                            "--test-n", "1500"), "scored on 600 items per task, this draw on 1500")):
        bad = _cycleqd("table", *args)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
