"""The Pareto front of scored models: those no other model beats on every task.

NSGA-II keeps it as its archive (``RUN/search.json``, and the front plot of ``cycleqd
heatmap``); for any run it is a pure function of the log.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` is at least as good as ``b`` on every task and better on one (qualities, maximised)."""
    return bool(np.all(a >= b) and np.any(a > b))


def pareto_front(models: Mapping[str, Mapping[str, float]], tasks: Sequence[str]) -> list[str]:
    """The ids of the non-dominated models among ``models`` (id -> scores), in the given order.

    Models lacking a task's score are left out; of models with equal scores all are kept.
    """
    ids = [g for g, s in models.items() if all(t in s for t in tasks)]
    pts = np.array([[float(models[g][t]) for t in tasks] for g in ids], dtype=np.float64).reshape(len(ids), len(tasks))
    keep = []
    for i in range(len(ids)):
        better_eq = np.all(pts >= pts[i], axis=1) & np.any(pts > pts[i], axis=1)
        if not better_eq.any():
            keep.append(ids[i])
    return keep
