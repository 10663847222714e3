"""CVT archives: a CVT whose centroids are the grid's cell centres is the grid; seeded centroids replay."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from cycleqd.config import ArchiveConfig, Bins, ConfigError, parse_config
from cycleqd.search.archive import Archive

TASKS = ["a", "b", "c"]
COUNT = 4
BINS = {"a": Bins(lo=0.1, hi=0.9, count=COUNT), "b": Bins(lo=0.0, hi=0.5, count=COUNT),
        "c": Bins(lo=0.2, hi=1.0, count=COUNT)}


def _score_sequence(n: int, seed: int) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    # a little outside the bin ranges too, so clamping is exercised
    return [{t: float(rng.uniform(-0.05, 1.0)) for t in TASKS} for _ in range(n)]


def test_cvt_on_grid_centres_makes_the_grids_insertions():
    centres = [[(i + 0.5) / COUNT, (j + 0.5) / COUNT] for i, j in itertools.product(range(COUNT), repeat=2)]
    grid = Archive(TASKS, BINS)
    cvt = Archive(TASKS, BINS, ArchiveConfig(kind="cvt", centroids=centres))
    inserted = 0
    for g, scores in enumerate(_score_sequence(400, 0)):
        took_grid = grid.offer(f"g{g}", scores, g)
        assert cvt.offer(f"g{g}", scores, g) == took_grid, f"child {g} with scores {scores}"
        inserted += len(took_grid)
    assert inserted > 3 * COUNT * COUNT  # cells were filled and improved, not just touched once
    for t in TASKS:
        by_grid = {e.genome: e for e in grid.elites(t)}
        by_cvt = {e.genome: e for e in cvt.elites(t)}
        assert by_grid.keys() == by_cvt.keys()
        for gid, e in by_cvt.items():
            # the centroid index maps back to the grid cell whose centre it is
            assert len(e.cell) == 1
            i, j = by_grid[gid].cell
            assert centres[e.cell[0]] == [(i + 0.5) / COUNT, (j + 0.5) / COUNT]
            assert e.quality == by_grid[gid].quality and e.scores == by_grid[gid].scores
        assert cvt.stats(t) == grid.stats(t)


def test_seeded_cvt_replays_exactly_and_reports_its_kind():
    spec = ArchiveConfig(kind="cvt", cells=30, seed=3)
    seq = [(f"g{i}", s, i) for i, s in enumerate(_score_sequence(200, 1))]
    one, two = Archive.replay(TASKS, BINS, seq, spec), Archive.replay(TASKS, BINS, seq, spec)
    assert one.to_json(200) == two.to_json(200)
    snap = one.to_json(200)
    assert snap["archive"]["kind"] == "cvt" and len(snap["archive"]["centroids"]) == 30
    assert all(0 <= e["cell"][0] < 30 for a in snap["archives"].values() for e in a["elites"])
    assert 0 < snap["archives"]["a"]["coverage"] <= 1
    other = Archive.replay(TASKS, BINS, seq, ArchiveConfig(kind="cvt", cells=30, seed=4))
    assert not np.array_equal(other.centroids, one.centroids)


@pytest.mark.parametrize("archive, message", [
    ({"kind": "cvt"}, "either cells"),
    ({"kind": "grid", "cells": 10}, "settings of a cvt"),
    ({"kind": "cvt", "centroids": [[0.5, 0.5, 0.5]]}, "3 dimensions"),
    ({"kind": "cvt", "centroids": [[0.5, 1.5]]}, "[0, 1]"),
    ({"kind": "voronoi", "cells": 10}, "archive.kind"),
])
def test_bad_archive_section_is_one_clear_error(archive, message):
    data = {"models": {"base": "b", "experts": {t: t for t in TASKS}},
            "tasks": [{"name": t, "kind": "likelihood"} for t in TASKS], "archive": archive}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(data)
