"""Heatmaps of CVT archives: Voronoi cells as pyribs draws them, or 2-D projections of the centroids.

A CVT archive over 2 normalised axes (K = 3) is drawn by
``ribs.visualize.cvt_archive_heatmap``: one Voronoi cell per centroid, coloured by
its elite's quality. Over 3 or more axes (K >= 4) each pair of axes gets a panel
of the centroids projected onto it, coloured by quality (the best elite drawn on
top); over 1 axis, the centroids on a line. Axes are the other tasks' scores
normalised by their bin ranges, 0 = lo and 1 = hi.
"""
from __future__ import annotations

import itertools
import math

import numpy as np


def cvt_heatmap_figure(snap, tasks: list[str] | None = None):
    """A matplotlib Figure of the CVT archives ``tasks`` (default all) of a CVT snapshot.

    Args:
        snap: a :class:`cycleqd.views.plots.ArchiveSnapshot` whose ``archive`` is
            ``{"kind": "cvt", "centroids": [[...], ...]}``.
    """
    import matplotlib as mpl
    from matplotlib.figure import Figure
    from ribs.archives import CVTArchive
    from ribs.visualize import cvt_archive_heatmap

    tasks = list(snap.tasks if tasks is None else tasks)
    centroids = np.asarray(snap.archive["centroids"], dtype=np.float64)
    dim = centroids.shape[1]
    pairs = list(itertools.combinations(range(dim), 2)) if dim >= 2 else [(0, None)]
    cols, rows = len(pairs), len(tasks)
    fig = Figure(figsize=(4.4 * cols, 3.9 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=0.6 / (4.4 * cols), right=0.96, bottom=0.5 / (3.9 * rows + 0.4),
                        top=1 - 0.75 / (3.9 * rows + 0.4), wspace=0.45, hspace=0.6)
    cmap = mpl.colormaps["viridis"]
    for r, task in enumerate(tasks):
        others = snap.other_tasks(task)
        arch = snap.archives[task]
        quality = np.full(len(centroids), np.nan)
        for e in arch["elites"]:
            quality[int(e["cell"][0])] = e["quality"]
        lo, hi = snap.bins[task].lo, snap.bins[task].hi
        title = f"{task} archive (CVT, {len(centroids)} cells; coverage {arch['coverage']:.0%}, best {arch['best']:.3f})"
        for c, (i, j) in enumerate(pairs):
            ax = axes[r][c]
            if dim == 2:
                # pyribs' own Voronoi drawing, from an archive holding these elites at their centroids
                ribs_arch = CVTArchive(solution_dim=0, centroids=centroids, ranges=[(0.0, 1.0)] * 2)
                filled = ~np.isnan(quality)
                if filled.any():
                    ribs_arch.add(np.zeros((int(filled.sum()), 0)), quality[filled], centroids[filled])
                cvt_archive_heatmap(ribs_arch, ax=ax, cmap="viridis", vmin=lo, vmax=hi, lw=0.3,
                                    cbar_kwargs={"label": f"{task} quality"})
            else:
                order = np.argsort(np.nan_to_num(quality, nan=-math.inf))  # best drawn last, on top
                ys = centroids[order, j] if j is not None else np.zeros(len(order))
                empty = np.isnan(quality[order])
                ax.scatter(centroids[order, i][empty], ys[empty], s=6, c="#d0d0d0")
                pts = ax.scatter(centroids[order, i][~empty], ys[~empty], s=18, c=quality[order][~empty],
                                 cmap=cmap, vmin=lo, vmax=hi)
                ax.set_xlim(-0.02, 1.02)
                ax.set_ylim(-0.02, 1.02)
                if c == cols - 1:
                    fig.colorbar(pts, ax=ax, label=f"{task} quality", fraction=0.046, pad=0.03)
            ax.set_xlabel(f"{others[i]} ({snap.bins[others[i]].lo:g}..{snap.bins[others[i]].hi:g})")
            if j is not None:
                ax.set_ylabel(f"{others[j]} ({snap.bins[others[j]].lo:g}..{snap.bins[others[j]].hi:g})")
            ax.set_title(title if c == 0 else "projection", fontsize=8)
    fig.suptitle(f"CycleQD CVT archives after {snap.generation} children", fontsize=10)
    return fig
