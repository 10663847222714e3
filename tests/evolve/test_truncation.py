"""The truncation guard: answers cut at max_new_tokens are counted per child and task, recorded in
children.jsonl, seeds.json, ``show --json`` and the report, and a run warns once when a share passes
``evolution.truncation_warning``."""
from __future__ import annotations

import json
import logging

from cycleqd.evolve.guards import TruncationGuard


def test_guard_warns_once_above_its_threshold(caplog):
    """Shares at or below the threshold pass; the first share above it warns, naming child, task and
    share; later ones stay silent."""
    guard = TruncationGuard(0.1)
    with caplog.at_level(logging.WARNING, logger="cycleqd"):
        assert guard.see("g1", {"code": 0.1, "sql": 0.0}) is None
        said = guard.see("g2", {"code": 0.05, "sql": 0.4})
        assert guard.see("g3", {"code": 1.0}) is None
    assert said and "g2" in said and "sql" in said and "40%" in said
    assert [r.getMessage() for r in caplog.records] == [said]


def test_tiny_max_new_tokens_is_recorded_and_warned(small_world, tmp_path, caplog, capsys):
    """A mini run with engine.max_new_tokens: 3 cuts nearly every answer: each child's shares are in
    children.jsonl, the seeds' in seeds.json, both in ``show --json`` and the report, and the run warns
    once. The same run with the default limit records smaller shares and, with a threshold of 1.0, no warning."""
    from mini_run import make_mini_run

    from cycleqd.cli import main
    from cycleqd.views.report import write_report

    def tiny(data: dict) -> None:
        data["engine"]["max_new_tokens"] = 3

    with caplog.at_level(logging.WARNING, logger="cycleqd"):
        run = make_mini_run(tmp_path / "tiny", small_world, "small", n=6, generations=2, record=False, edit=tiny)
    warnings = [r for r in caplog.records if "max_new_tokens" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    lines = [json.loads(x) for x in (run / "children.jsonl").read_text().splitlines()]
    assert lines and all(x["truncated"]["code"] >= 0.5 for x in lines if x["error"] is None)
    seeds = json.loads((run / "seeds.json").read_text())
    assert all(s["truncated"]["sql"] >= 0.5 for s in seeds.values())
    assert main(["show", str(run), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["truncated"]
    assert shown["threshold"] == 0.1 and shown["tasks"]["code"]["max"] >= 0.5
    assert shown["tasks"]["code"]["over_threshold"] >= 1 and lines[0]["id"] in shown["genomes"]
    html = write_report(run).read_text()
    assert "<h2>Truncation</h2>" in html and "100.0%" in html

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cycleqd"):  # the default limit, a threshold no share passes
        run = make_mini_run(tmp_path / "full", small_world, "small", n=6, generations=1, record=False,
                            edit=lambda data: data["evolution"].update(truncation_warning=1.0))
    assert "max_new_tokens" not in caplog.text
    line = json.loads((run / "children.jsonl").read_text().splitlines()[0])
    assert line["truncated"]["code"] < 0.5 and set(line["truncated"]) == {"code", "sql", "shell"}
