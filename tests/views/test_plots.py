"""Heatmaps and history plots, drawn from short real runs of the evolve loop.

``real_run`` (also used by test_show, test_report, test_export and the run-folder tests) runs
what ``cycleqd.evolve.loop.evolve`` does, in process, on the tiny model family with the ``likelihood`` task, once
per process and task count.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from run_helpers import BINS, local_ray, real_run  # noqa: F401 (BINS: used by the bins tests)

from cycleqd.config import ConfigError


@pytest.fixture(scope="module")
def run3(tmp_path_factory) -> Path:
    return real_run(tmp_path_factory)


def _png_pixels(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(path)[..., :3]


def _coloured(px: np.ndarray) -> int:
    """Pixels that are neither grey nor white (the heatmap cells, the seed outlines)."""
    return int(((px.max(-1) - px.min(-1)) > 0.15).sum())


def test_heatmaps_png_and_svg_per_archive(run3, tmp_path):
    from cycleqd.views.plots import write_heatmaps

    files = write_heatmaps(run3, tmp_path)
    tasks = json.loads((run3 / "archives.json").read_text())["tasks"]
    names = {f.name for f in files}
    for stem in ["heatmaps", *[f"heatmap_{t}" for t in tasks]]:
        assert {f"{stem}.png", f"{stem}.svg"} <= names
    for f in files:
        assert f.is_file() and f.stat().st_size > 5000
    assert (tmp_path / "heatmaps.svg").read_text().lstrip().startswith("<?xml")
    assert _coloured(_png_pixels(tmp_path / "heatmaps.png")) > 500


def test_grid_matches_archives_json(run3):
    from cycleqd.views.plots import load_snapshot

    data = json.loads((run3 / "archives.json").read_text())
    snap = load_snapshot(run3)
    for t in data["tasks"]:
        g = snap.grid(t)
        assert g.shape == (BINS["count"], BINS["count"])
        elites = data["archives"][t]["elites"]
        assert np.count_nonzero(~np.isnan(g)) == len(elites) > 0
        for e in elites:
            assert g[tuple(e["cell"])] == e["quality"]


def test_seed_cells_are_outlined(run3):
    from matplotlib.patches import Rectangle

    from cycleqd.config import Bins
    from cycleqd.search.archive import bin_index
    from cycleqd.views.plots import heatmap_figure, load_snapshot

    snap = load_snapshot(run3)
    seeds = json.loads((run3 / "seeds.json").read_text())
    b = Bins(**BINS)
    edges = np.linspace(b.lo, b.hi, b.count + 1)
    fig = heatmap_figure(snap)
    for ax, task in zip([a for a in fig.axes if a.get_label() != "<colorbar>"], snap.tasks):
        x_t, y_t = snap.other_tasks(task)
        boxes = {(round(p.get_x(), 9), round(p.get_y(), 9)) for p in ax.patches if isinstance(p, Rectangle)}
        want = {(round(edges[bin_index(s["scores"][x_t], b)], 9), round(edges[bin_index(s["scores"][y_t], b)], 9))
                for s in seeds.values()}
        assert boxes == want, task


@pytest.mark.parametrize("at_end", [False, True])
def test_generation_replay_matches_what_the_run_logged(run3, at_end):
    """Rebuilding the archives after N children gives the stats the run logged after N children."""
    from cycleqd.views.plots import load_snapshot

    stats = [json.loads(line) for line in (run3 / "stats.jsonl").read_text().splitlines()]
    lines = stats[-1:] if at_end else stats[:-1]
    for line in lines:
        snap = load_snapshot(run3, line["generation"])
        for t, s in line["archives"].items():
            a = snap.archives[t]
            assert a["coverage"] == pytest.approx(s["coverage"]) and a["best"] == pytest.approx(s["best"])
            assert a["qd_score"] == pytest.approx(s["qd_score"])
    if at_end:
        final = json.loads((run3 / "archives.json").read_text())
        snap = load_snapshot(run3, stats[-1]["generation"])
        assert {t: snap.archives[t]["elites"] for t in snap.tasks} == {
            t: final["archives"][t]["elites"] for t in final["tasks"]}


def test_generation_zero_holds_only_seeds_and_writes_suffixed_files(run3, tmp_path):
    from cycleqd.views.plots import load_snapshot, write_heatmaps

    snap = load_snapshot(run3, 0)
    genomes = {e["genome"] for t in snap.tasks for e in snap.archives[t]["elites"]}
    assert genomes and all(g.startswith("seed_") for g in genomes)
    files = write_heatmaps(run3, tmp_path, generation=0)
    assert (tmp_path / "heatmaps_gen0.png") in files


@pytest.mark.parametrize("gen", [-1, 10_000])
def test_generation_out_of_range_is_bad_input(run3, tmp_path, gen):
    from cycleqd.views.plots import write_heatmaps

    with pytest.raises(ConfigError, match="generation"):
        write_heatmaps(run3, tmp_path / "x", generation=gen)
    assert not (tmp_path / "x").exists()


def test_not_a_run_is_bad_input(tmp_path):
    from cycleqd.views.plots import write_heatmaps, write_history

    with pytest.raises(ConfigError):
        write_heatmaps(tmp_path / "nope")
    with pytest.raises(ConfigError):
        write_history(tmp_path)


def test_history_plot(run3, tmp_path):
    from cycleqd.views.plots import write_history

    files = write_history(run3, tmp_path)
    assert [f.name for f in files] == ["history.png", "history.svg"]
    assert _coloured(_png_pixels(files[0])) > 200  # the coloured lines


def test_evolve_loop_refreshed_plots_quickly(run3):
    from cycleqd.views.plots import refresh_plots

    plots = run3 / "plots"
    assert (plots / "heatmaps.png").is_file() and (plots / "history.png").is_file()
    before = (plots / "heatmaps.png").stat().st_mtime_ns
    t0 = time.perf_counter()
    written = refresh_plots(run3)
    took = time.perf_counter() - t0
    assert {p.name for p in written} == {"heatmaps.png", "history.png"}
    assert (plots / "heatmaps.png").stat().st_mtime_ns >= before
    assert took < 10  # about half a second on an idle laptop core; generous for a loaded CI box
    assert refresh_plots(run3.parent / "no_run_here") == []


def test_two_tasks_draw_one_row_heatmaps(tmp_path_factory, tmp_path):
    from cycleqd.views.plots import heatmap_figure, load_snapshot, write_heatmaps

    run = real_run(tmp_path_factory, "ab", generations=3, workers=1)
    snap = load_snapshot(run)
    assert snap.grid("a").shape == (BINS["count"],)
    fig = heatmap_figure(snap)
    meshes = [c for ax in fig.axes if ax.get_label() != "<colorbar>" for c in ax.collections]
    assert [m.get_array().shape for m in meshes] == [(1, BINS["count"])] * 2
    files = write_heatmaps(run, tmp_path)
    assert all(f.stat().st_size > 5000 for f in files)


@pytest.mark.slow
def test_four_tasks_draw_pair_panels(tmp_path_factory, tmp_path):
    from cycleqd.views.plots import heatmap_figure, load_snapshot

    run = real_run(tmp_path_factory, "abcd", generations=3, workers=1)
    snap = load_snapshot(run)
    fig = heatmap_figure(snap)
    panels = [ax for ax in fig.axes if ax.collections and ax.get_label() != "<colorbar>"]
    assert len(panels) == 4 * 3  # per archive: one panel per pair of its 3 axes
    # Each pair panel shows the best quality over the remaining axis.
    g = snap.grid("a")  # axes b, c, d
    best_bc = np.where(np.isnan(g), -np.inf, g).max(axis=2)
    z = panels[0].collections[0].get_array()
    shown = np.where(np.ma.getmaskarray(z), -np.inf, np.ma.getdata(z))
    assert np.array_equal(shown, best_bc.T)
