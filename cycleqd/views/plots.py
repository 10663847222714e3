"""Archive heatmaps and run-history plots, drawn from a run folder's files.

The heatmap is the paper's figure: one panel per archive, the archive's task
quality as colour (scaled to that task's bin range), the other tasks' bins as
axes (in score units, so each bin is labelled by its score range) and the seed
experts' cells outlined in red. Archives of a K = 2 run are 1-D (a one-row
heatmap); K = 3 gives 2-D grids; for K >= 4 each archive is shown as one 2-D
panel per pair of its axes, the best quality over the remaining axes in each cell.

Everything reads the run folder through :class:`cycleqd.runs.folder.RunFolder`
(archives rebuilt from seeds.json and children.jsonl when needed, stats.jsonl), draws on matplotlib's
Agg canvas without pyplot (no global state, safe inside the evolve loop) and is
quick enough to refresh every few generations.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np

from cycleqd.config import Bins
from cycleqd.runs import layout
from cycleqd.runs.folder import SEED_PREFIX, ArchiveSnapshot, RunFolder
from cycleqd.search.archive import bin_index

__all__ = [
    "ArchiveSnapshot",
    "PlotObserver",
    "heatmap_figure",
    "load_snapshot",
    "refresh_plots",
    "write_heatmaps",
    "write_history",
]

SEED_COLOR = "#d62728"


def load_snapshot(run_dir: str | Path, generation: int | None = None) -> ArchiveSnapshot:
    """The archives of a run now or after ``generation`` children (:meth:`RunFolder.snapshot`)."""
    return RunFolder(run_dir).snapshot(generation)


# ---------------------------------------------------------------------------------------------
# drawing


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # Agg canvas on save; never pyplot

    # A fixed layout: constrained/tight layout would double the drawing time.
    return Figure(figsize=(width, height))


def _edges(b: Bins) -> np.ndarray:
    return np.linspace(b.lo, b.hi, b.count + 1)


def _panels(snap: ArchiveSnapshot, task: str) -> list[tuple[str, str | None, list[str], np.ndarray]]:
    """(x task, y task, tasks maximised over, 2-D array [y, x]) per panel of one archive."""
    others = snap.other_tasks(task)
    g = snap.grid(task)
    if len(others) == 1:
        return [(others[0], None, [], g[None, :])]
    panels = []
    for i, j in itertools.combinations(range(len(others)), 2):
        rest = tuple(k for k in range(len(others)) if k not in (i, j))
        proj = _nanmax(g, rest) if rest else g
        panels.append((others[i], others[j], [others[k] for k in rest], proj.T))  # rows = y = others[j]
    return panels


def _nanmax(g: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    filled = np.where(np.isnan(g), -np.inf, g).max(axis=axes)
    return np.where(np.isneginf(filled), np.nan, filled)


def _draw_panel(ax, snap: ArchiveSnapshot, task: str, xt: str, yt: str | None, z: np.ndarray):
    import matplotlib as mpl
    from matplotlib.patches import Rectangle

    xe = _edges(snap.bins[xt])
    ye = _edges(snap.bins[yt]) if yt else np.array([0.0, 1.0])
    cmap = mpl.colormaps["viridis"].with_extremes(bad="#f0f0f0")
    # Colour spans the archive task's own bin range, the range the experiment cares about.
    mesh = ax.pcolormesh(xe, ye, np.ma.masked_invalid(z), cmap=cmap, vmin=snap.bins[task].lo,
                         vmax=snap.bins[task].hi, edgecolors="white", linewidth=0.3)
    ax.set_xlim(xe[0], xe[-1])
    ax.set_ylim(ye[0], ye[-1])
    ax.set_xlabel(f"{xt} score")
    if yt:
        ax.set_ylabel(f"{yt} score")
        ax.set_aspect((xe[-1] - xe[0]) / (ye[-1] - ye[0]))
    else:
        ax.set_yticks([])
    # Seed experts: outline the cell each one lands in, so one sees where the search started.
    at: dict[tuple[int, int], list[str]] = {}
    for sid, scores in sorted(snap.seeds.items()):
        if xt in scores and (yt is None or yt in scores):
            iy = bin_index(scores[yt], snap.bins[yt]) if yt else 0
            at.setdefault((bin_index(scores[xt], snap.bins[xt]), iy), []).append(sid.removeprefix(SEED_PREFIX))
    for (ix, iy), names in at.items():
        ax.add_patch(Rectangle((xe[ix], ye[iy]), xe[ix + 1] - xe[ix], ye[iy + 1] - ye[iy], fill=False,
                               edgecolor=SEED_COLOR, linewidth=1.8, zorder=3, label="seed " + ",".join(names)))
        ax.annotate(",".join(names), ((xe[ix] + xe[ix + 1]) / 2, ye[iy + 1]), ha="center", va="bottom",
                    fontsize=7, color=SEED_COLOR, zorder=4, annotation_clip=False,
                    bbox={"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none", "alpha": 0.7})
    return mesh


def _draw_archive(fig, axes, snap: ArchiveSnapshot, task: str) -> None:
    arch = snap.archives[task]
    panels = _panels(snap, task)
    for i, (ax, (xt, yt, rest, z)) in enumerate(zip(axes, panels)):
        mesh = _draw_panel(ax, snap, task, xt, yt, z)
        title = f"{task} archive  (coverage {arch['coverage']:.0%}, best {arch['best']:.3f})"
        if rest:
            title += f"\nbest over {', '.join(rest)} bins"
        ax.set_title(title, fontsize=9, pad=14 if yt is None else 6)  # 1-D: room for the seed labels
        if i == len(panels) - 1:  # one colour bar per archive: the task's bin range, shared by its panels
            fig.colorbar(mesh, ax=ax, label=f"{task} quality", fraction=0.046, pad=0.03)


def _layout(fig, rows: int, one_d: bool) -> None:
    # Margins in inches, so labels fit whatever the number of rows.
    w, h = fig.get_size_inches()
    bottom, top = (0.75 if one_d else 0.55), 0.5 if rows == 1 else 0.95
    row_h = (h - bottom - top) / rows
    fig.subplots_adjust(left=0.6 / w, right=1 - 0.75 / w, bottom=bottom / h, top=1 - top / h, wspace=0.55,
                        hspace=min(0.9 / max(row_h - 0.9, 0.1), 1.0))


def _n_panels(k: int) -> int:
    return max(1, math.comb(k - 1, 2)) if k - 1 >= 2 else 1


def _save(fig, path_stem: Path, formats: tuple[str, ...]) -> list[Path]:
    out = []
    for fmt in formats:
        p = path_stem.with_suffix(f".{fmt}")
        tmp = p.with_name(f".{p.name}.tmp")
        fig.savefig(tmp, format=fmt, dpi=110)
        tmp.replace(p)  # readers (the report, a browser) never see half a file
        out.append(p)
    return out


def heatmap_figure(snap: ArchiveSnapshot, tasks: list[str] | None = None):
    """A matplotlib Figure of the archives ``tasks`` (default all) of ``snap``.

    K <= 3: the archives side by side; K >= 4: one row of pair panels per archive.
    Each seed expert's cell is a red Rectangle patch labelled "seed <task>".
    """
    if snap.archive.get("kind") == "cvt":
        from cycleqd.views.cvt_plot import cvt_heatmap_figure

        return cvt_heatmap_figure(snap, tasks)
    tasks = list(snap.tasks if tasks is None else tasks)
    k, n = len(snap.tasks), _n_panels(len(snap.tasks))
    one_d = k == 2
    pw, ph = (5.2, 2.3) if one_d else (4.6, 3.8)
    rows, cols = (len(tasks), n) if n > 1 else (1, len(tasks))
    fig = _figure(pw * cols, ph * rows + (0.4 if len(tasks) > 1 else 0.2))
    grid = fig.subplots(rows, cols, squeeze=False)
    _layout(fig, rows, one_d)
    for i, task in enumerate(tasks):
        _draw_archive(fig, grid[i] if n > 1 else [grid[0][i]], snap, task)
    if len(tasks) > 1:
        fig.suptitle(f"CycleQD archives after {snap.generation} children", fontsize=10)
    return fig


def write_heatmaps(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    generation: int | None = None,
    *,
    formats: tuple[str, ...] = ("png", "svg"),
    per_archive: bool = True,
) -> list[Path]:
    """Draw the archives of a run (after ``generation`` children, default all) as heatmaps.

    Writes ``heatmaps[_gen<N>].<fmt>`` (all archives) and, with ``per_archive``,
    ``heatmap_<task>[_gen<N>].<fmt>`` per archive into ``out_dir`` (default RUN/plots).
    Returns the written paths. Raises ConfigError for a bad run folder or generation.
    """
    folder = RunFolder(run_dir)
    snap = folder.snapshot(generation)
    out = Path(out_dir) if out_dir is not None else folder.store.plots_dir
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if generation is None else f"_gen{generation}"
    written = _save(heatmap_figure(snap), out / f"heatmaps{suffix}", formats)
    if per_archive:
        for task in snap.tasks:
            written += _save(heatmap_figure(snap, [task]), out / f"heatmap_{task}{suffix}", formats)
    return written


def write_history(run_dir: str | Path, out_dir: str | Path | None = None, *,
                  formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Plot coverage, QD score and best quality per task against generation (from stats.jsonl).

    Writes ``history.<fmt>`` into ``out_dir`` (default RUN/plots); returns the paths,
    empty when the run has no stats yet. Raises ConfigError for a bad run folder.
    """
    store = RunFolder(run_dir).store
    stats = store.stats()
    out = Path(out_dir) if out_dir is not None else store.plots_dir
    out.mkdir(parents=True, exist_ok=True)
    if not stats:
        return []
    tasks = list(stats[-1]["archives"])
    gens = np.array([s["generation"] for s in stats])
    fig = _figure(12.0, 3.3)
    axes = fig.subplots(1, 3)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.16, top=0.9, wspace=0.32)
    for ax, key, label in zip(axes, ("coverage", "qd_score", "best"), ("coverage", "QD score", "best quality")):
        for t in tasks:
            ys = np.array([s["archives"].get(t, {}).get(key, np.nan) for s in stats], dtype=float)
            ax.plot(gens, ys, label=t, marker="." if len(gens) < 40 else None)
        ax.set_xlabel("generation")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="archive", title_fontsize=8)
    return _save(fig, out / "history", formats)


def refresh_plots(run_dir: str | Path) -> list[Path]:
    """Redraw RUN/plots/heatmaps.png and history.png (quick; called by the evolve loop).

    Never raises for a run that has not written its files yet; returns what it wrote.
    """
    run = Path(run_dir)
    if not (run / layout.CONFIG).is_file() or not RunFolder(run).seeds:
        return []
    out = run / layout.PLOTS
    return write_heatmaps(run, out, formats=("png",), per_archive=False) + write_history(run, out, formats=("png",))


class PlotObserver:
    """An observer of the evolve loop that redraws RUN/plots every ``every`` children and at the end.

    Plots stay off the driver's hot path: while the run goes on, each drawing runs in a separate
    process (one at a time, from the files on disk), started once ``every`` children finished since
    the last and at least ``max(min_interval_s, 10 x the last drawing's seconds)`` after it, so
    drawing takes a bounded share of the machine however fast children come (a real run's
    children take minutes: every ``every`` children). The drawings at the seeds and at the end
    are made in this process; a background drawing still running at the end is stopped, not
    waited for. Plots never stop a run: a drawing error is logged and the run goes on.
    """

    def __init__(self, every: int = 10, min_interval_s: float = 10.0):
        self.every, self.min_interval_s = every, min_interval_s
        self._proc = None
        self._started = -math.inf
        self._last_s = 0.0
        self._since = 0

    def _refresh(self, run_dir: Path) -> None:
        import logging

        try:
            refresh_plots(run_dir)
        except Exception as e:  # plots never stop a run
            logging.getLogger("cycleqd").warning("plots not refreshed: %s", e)

    def _busy(self) -> bool:
        """True while a background drawing runs; notes the last one's duration and failure."""
        import logging
        import time

        if self._proc is None:
            return False
        if self._proc.poll() is None:
            return True
        self._last_s = time.monotonic() - self._started
        if self._proc.returncode:
            logging.getLogger("cycleqd").warning("plots not refreshed: the drawing exited %d", self._proc.returncode)
        self._proc = None
        return False

    def _spawn(self, run_dir: Path) -> None:
        import atexit
        import os
        import subprocess
        import sys
        import time

        root = str(Path(__file__).resolve().parents[2])  # the folder holding the cycleqd package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self._started = time.monotonic()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from cycleqd.views.plots import refresh_plots; "
             "refresh_plots(sys.argv[1])", str(run_dir)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        atexit.register(self.wait)

    def wait(self) -> None:
        """Wait for a background drawing to end (run_done and exit call it)."""
        if self._proc is not None:
            self._proc.wait()
            self._busy()

    def seeds_done(self, run_dir: Path, archive) -> None:
        self._refresh(run_dir)

    def child_done(self, run_dir: Path, record, archive) -> None:
        import time

        self._since += 1
        if self._since < self.every or self._busy():
            return
        if time.monotonic() - self._started < max(self.min_interval_s, 10 * self._last_s):
            return
        self._since = 0
        try:
            self._spawn(run_dir)
        except OSError as e:
            import logging

            logging.getLogger("cycleqd").warning("plots not refreshed: %s", e)

    def stop(self) -> None:
        """End a background drawing now: the end's own drawing replaces it (files are replaced whole)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def run_done(self, run_dir: Path, archive) -> None:
        self.stop()  # not waited for: its picture is older than the one drawn next
        self._refresh(run_dir)
