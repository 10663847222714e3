"""The Pareto front of a run (NSGA-II's archive) as a figure: every finished child's scores
for each pair of tasks, the front's children marked, the seed experts as reference.

Drawn from the log through :meth:`cycleqd.runs.folder.RunFolder.front`, on matplotlib's Agg
canvas without pyplot, like :mod:`cycleqd.views.plots`.
"""
from __future__ import annotations

import itertools
from pathlib import Path

from cycleqd.runs.folder import RunFolder
from cycleqd.views.plots import SEED_COLOR, _figure, _save

__all__ = ["front_figure", "write_front"]


def front_figure(folder: RunFolder, generation: int | None = None):
    """A Figure with one panel per pair of tasks: children (grey), the front (blue), seed experts (red)."""
    tasks = folder.tasks
    n = generation if generation is not None else folder.generation
    children = [c for c in folder.children[:n] if c.ok]
    front = {f["genome"] for f in folder.front(n)}
    pairs = list(itertools.combinations(tasks, 2))
    fig = _figure(3.8 * len(pairs), 3.6)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.85, wspace=0.3)
    for ax, (x, y) in zip(axes, pairs):
        rest = [c for c in children if c.id not in front]
        ax.scatter([c.scores[x] for c in rest], [c.scores[y] for c in rest], s=12, c="#9a9a9a", label="children")
        best = [c for c in children if c.id in front]
        ax.scatter([c.scores[x] for c in best], [c.scores[y] for c in best], s=22, c="#1f77b4", label="front")
        for t, s in folder.seeds.items():
            ax.scatter([s["scores"][x]], [s["scores"][y]], marker="x", c=SEED_COLOR, s=30)
            ax.annotate(f"seed {t}", (s["scores"][x], s["scores"][y]), fontsize=7, color=SEED_COLOR)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Pareto front: {len(front)} of {len(children)} children, after {n}", fontsize=10)
    return fig


def write_front(run_dir: str | Path, out_dir: str | Path | None = None, generation: int | None = None, *,
                formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Write ``front[_gen<N>].<fmt>`` into ``out_dir`` (default RUN/plots); returns the paths."""
    folder = RunFolder(run_dir)
    out = Path(out_dir) if out_dir is not None else folder.store.plots_dir
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if generation is None else f"_gen{generation}"
    return _save(front_figure(folder, generation), out / f"front{suffix}", formats)
