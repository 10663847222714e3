"""cma_es, nsga2 and random end to end on the small mini world: 2 Ray workers through the CLI,
SIGKILL mid-run, resume; nothing lost, every child's genome the point its search asks, and
show / heatmap / export read the run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mini_run import mini_config_data
from run_helpers import cli_env, evolve_until_then_kill

from cycleqd.registry import SEARCHES
from cycleqd.runs.store import RunStore

GENERATIONS = 10
OPTIONS = {"cma_es": {"population": 4}, "nsga2": {"population": 4}, "random": {}}


def _show(run: Path) -> dict:
    """``cycleqd show RUN --json`` in this process (no Ray)."""
    import contextlib
    import io

    from cycleqd.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["show", str(run), "--json"]) == 0
    return json.loads(buf.getvalue())


def _config(root: Path, world: Path, search: str) -> Path:
    """experiments/mini.yaml over the small world, 6 val items per task, ``search`` with small batches."""
    data = mini_config_data(world, "small", 6)
    data["evolution"].update(workers=2, generations=GENERATIONS, final_merge=False,
                             search={"name": search, "options": OPTIONS[search]})
    data["prepare_cache"] = str(root / "prepare")
    path = root / f"{search}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _points(cfg, log) -> dict[int, np.ndarray]:
    """Every point the search draws when it replays ``log`` (index -> point, clipped)."""
    cls = SEARCHES.get(cfg.evolution.search.name)

    class Recording(cls):
        def _draw(self):
            pts = super()._draw()
            self.seen = [*getattr(self, "seen", []), *pts]
            return pts

    s = Recording(cfg, None, log)
    return {i: s.space.clip(x) for i, x in enumerate(s.seen)}, s.space


@pytest.mark.slow
@pytest.mark.parametrize("search", ["cma_es", "nsga2", "random"])
def test_search_killed_and_resumed_loses_nothing(search, small_world, tmp_path):
    """SIGKILL after 3 children of 10 (2 Ray workers), then `cycleqd resume` (on Ray, or in process): 10 children, each index once (the ones in
    flight asked again), every genome is the search's point for its index, archives kept, the search's
    state in the folder, and show / heatmap / export work on the run."""
    cfg_path, run = _config(tmp_path, small_world, search), tmp_path / "run"
    evolve_until_then_kill(["evolve", "--config", str(cfg_path), "--run-dir", str(run), "--workers", "2"], run, 3,
                           env=cli_env())
    store = RunStore(run)
    before = RunStore(run).children()
    assert 3 <= len(before) < GENERATIONS
    before_archive = _show(run)

    where = () if search == "cma_es" else ("--in-process",)  # on Ray once; in process, as a user may resume
    res = subprocess.run([sys.executable, "-m", "cycleqd.cli", "-q", "resume", str(run), *where],
                         capture_output=True, text=True, env=cli_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    children = store.children()
    assert [c.generation for c in children] == list(range(1, GENERATIONS + 1))
    assert sorted(c.index for c in children) == list(range(GENERATIONS))  # nothing lost, nothing twice
    assert children[:len(before)] == before and all(c.ok and c.parents == () for c in children)
    assert all(c.quality_task == search for c in children)

    cfg = store.config()
    points, space = _points(cfg, children)
    for c in children:  # the genome of every child is its point of the box, however the run was split
        g = store.load_genome(c.id)
        want = torch.tensor(space.coefficients(points[c.index]), dtype=torch.float32)
        assert torch.equal(g.a, want) and not g.d.any(), c.id
        assert float(g.a.min()) >= 0.0 and float(g.a.max()) <= 1.0

    state = store.search_state()
    assert state["search"] == search and state["generation"] == GENERATIONS
    if search == "nsga2":
        assert state["front"] and {f["genome"] for f in state["front"]} <= {c.id for c in children}

    after = _show(run)
    assert after["search"]["name"] == search
    for task, arch in before_archive["archives"].items():
        kept = {tuple(e["cell"]): e["quality"] for e in after["archives"][task]["elites"]}
        assert all(kept.get(tuple(e["cell"]), -1) >= e["quality"] for e in arch["elites"])
    if search == "nsga2":  # its archive, the Pareto front, in show and as a figure
        assert {f["genome"] for f in after["search"]["front"]} == {f["genome"] for f in state["front"]}
    from cycleqd.cli import main

    assert main(["heatmap", str(run), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "heatmaps.png").is_file()
    assert (tmp_path / "plots" / "front.png").is_file() == (search == "nsga2")
    assert main(["export", str(run), "--best", "mean", "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "config.json").is_file()
