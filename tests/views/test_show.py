"""``cycleqd show``: the rich tables list every elite with its scores and parents."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from rich.console import Console
from run_helpers import real_run

from cycleqd.config import ConfigError


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return real_run(tmp_path_factory)


def _render(run: Path, **kw) -> str:
    from cycleqd.views.show import render_show

    console = Console(record=True, width=250, color_system=None)
    render_show(run, console, **kw)
    return console.export_text()


def test_every_elite_is_listed_with_scores_generation_and_parents(run):
    text = _render(run)
    snap = json.loads((run / "archives.json").read_text())
    parents = {}
    for line in (run / "children.jsonl").read_text().splitlines():
        c = json.loads(line)
        parents[c["id"]] = c["parents"]
    k = len(snap["tasks"])
    sections = {}  # archive -> {(cell, genome): tokens of its row}
    current = None
    for line in text.splitlines():
        tokens = line.split()
        if line.startswith("archive "):
            current = sections.setdefault(line.split(":")[0].removeprefix("archive "), {})
        elif current is not None and tokens and re.fullmatch(r"\d+(,\d+)*", tokens[0]):
            current[(tokens[0], tokens[k + 3])] = tokens
    n = 0
    for t in snap["tasks"]:
        assert f"archive {t}: {len(snap['archives'][t]['elites'])} elites" in text
        assert len(sections[t]) == len(snap["archives"][t]["elites"])
        for e in snap["archives"][t]["elites"]:
            row = sections[t][(",".join(map(str, e["cell"])), e["genome"])]
            assert row[1 : k + 1] == [f"{e['scores'][u]:.4f}" for u in snap["tasks"]]
            assert row[1 + snap["tasks"].index(t)] == f"{e['quality']:.4f}"
            assert row[k + 1] == f"{sum(e['scores'][u] for u in snap['tasks']) / k:.4f}"
            assert row[k + 2] == str(e["generation"])
            want = parents[e["genome"]] if e["genome"] in parents else ["seed", "expert"]
            assert row[k + 4 :] == want
            n += 1
    assert n > 3
    assert f"{snap['generation']} finished children" in text
    assert "final merge" in text


def test_top_limits_rows(run):
    text = _render(run, top=1)
    snap = json.loads((run / "archives.json").read_text())
    for t in snap["tasks"]:
        more = len(snap["archives"][t]["elites"]) - 1
        if more:
            assert f"{more} more elites not shown" in text
    best_a = max(snap["archives"]["a"]["elites"], key=lambda e: e["quality"])
    assert best_a["genome"] in text


def test_not_a_run(tmp_path):
    from cycleqd.views.show import render_show

    with pytest.raises(ConfigError):
        render_show(tmp_path, Console(file=open("/dev/null", "w")))


def test_show_reads_a_run_without_importing_torch(run):
    """``cycleqd show`` only reads the folder's JSON: it starts in well under a second, without torch."""
    import subprocess
    import sys

    code = ("import contextlib, io, json, sys; from cycleqd.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out: code = main(['-q', 'show', sys.argv[1], '--json'])\n"
            "assert code == 0 and json.loads(out.getvalue())['archives'], code\n"
            "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
