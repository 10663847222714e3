"""Archive: (lo, hi] bins with clamping, insertion rule, replay, JSON snapshot."""
import pytest

from cycleqd.config import Bins
from cycleqd.search.archive import Archive, bin_index


class TestBins:
    @pytest.mark.parametrize(
        "score,expected",
        [(0.0, 0), (0.05, 0), (0.0500001, 1), (0.1, 1), (0.7, 13), (0.75, 14), (0.9, 14), (-0.2, 0)],
    )
    def test_lo_hi_closed_on_the_right_and_clamped(self, score, expected):
        assert bin_index(score, Bins(lo=0.0, hi=0.75, count=15)) == expected


@pytest.fixture
def arch():
    return Archive(["a", "b", "c"], {t: Bins(count=5) for t in "abc"})


class TestInsertion:
    def test_first_model_fills_every_archive(self, arch):
        assert arch.offer("g1", {"a": 0.5, "b": 0.2, "c": 0.9}, 1) == ["a", "b", "c"]
        assert arch.elites("a")[0].cell == (0, 4)  # b=0.2 -> bin 0; c=0.9 -> bin 4
        assert arch.elites("b")[0].cell == (2, 4)

    def test_cell_keeps_the_best_quality_on_its_own_task(self, arch):
        arch.offer("g1", {"a": 0.5, "b": 0.2, "c": 0.9}, 1)
        taken = arch.offer("g2", {"a": 0.55, "b": 0.1, "c": 0.85}, 2)  # same cells, better on a, worse on b, c
        assert taken == ["a"]
        assert arch.elites("a")[0].genome == "g2"
        assert arch.elites("b")[0].genome == "g1"
        assert arch.offer("g3", {"a": 0.55, "b": 0.1, "c": 0.85}, 3) == []  # a tie does not replace

    def test_new_cell_always_taken(self, arch):
        arch.offer("g1", {"a": 0.5, "b": 0.2, "c": 0.9}, 1)
        assert "a" in arch.offer("g2", {"a": 0.01, "b": 0.7, "c": 0.9}, 2)
        assert len(arch.elites("a")) == 2

    def test_stats_and_json(self, arch):
        arch.offer("g1", {"a": 0.5, "b": 0.2, "c": 0.9}, 1)
        arch.offer("g2", {"a": 0.3, "b": 0.7, "c": 0.1}, 2)
        s = arch.to_json(2)
        assert s["generation"] == 2 and s["tasks"] == ["a", "b", "c"]
        assert s["archives"]["a"]["coverage"] == pytest.approx(2 / 25)
        assert s["archives"]["a"]["qd_score"] == pytest.approx(0.8)
        assert s["archives"]["c"]["best"] == pytest.approx(0.9)
        e = s["archives"]["b"]["elites"][0]
        assert set(e) == {"cell", "quality", "scores", "genome", "generation"}

    def test_replay_equals_incremental(self, arch):
        seq = [("g1", {"a": 0.5, "b": 0.2, "c": 0.9}, 1), ("g2", {"a": 0.3, "b": 0.7, "c": 0.1}, 2),
               ("g3", {"a": 0.6, "b": 0.25, "c": 0.95}, 3)]
        for g in seq:
            arch.offer(*g)
        again = Archive.replay(arch.tasks, arch.bins, seq)
        assert again.to_json(3) == arch.to_json(3)

    def test_missing_score_is_an_error(self, arch):
        with pytest.raises(ValueError, match="lack"):
            arch.offer("g1", {"a": 0.5, "b": 0.2}, 1)
