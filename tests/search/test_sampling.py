"""Parent sampling: elite weights favour quality and bin coordinates; uniform does not."""
import numpy as np
import pytest

from cycleqd.config import SamplingConfig
from cycleqd.search.archive import Elite
from cycleqd.search.sampling import elite, uniform


def _elites():
    return [Elite("a", (i, j), q, {}, f"g{i}{j}", 1) for i, j, q in [(0, 0, 0.1), (4, 4, 0.9), (2, 1, 0.5)]]


def _freq(fn, n=6000):
    rng = np.random.default_rng(0)
    picks = [p.genome for _ in range(n // 2) for p in fn(_elites(), 2, SamplingConfig(), rng)]
    return {g: picks.count(g) / len(picks) for g in {e.genome for e in _elites()}}


def test_elite_prefers_high_quality_and_coordinates():
    f = _freq(elite)
    assert f["g44"] > f["g21"] > f["g00"]


def test_elite_weights_follow_the_paper_range():
    # weights: 0.5^3 (all minimum), 0.8^3 (all maximum) -> ratio 4.096 in single draws
    rng = np.random.default_rng(1)
    cfg = SamplingConfig(low=0.5, high=0.8)
    picks = [elite(_elites(), 1, cfg, rng)[0].genome for _ in range(20000)]
    ratio = picks.count("g44") / picks.count("g00")
    assert ratio == pytest.approx(0.8**3 / 0.5**3, rel=0.1)


def test_uniform_is_flat():
    f = _freq(uniform)
    assert max(f.values()) - min(f.values()) < 0.05


def test_single_elite_is_drawn_twice_and_empty_is_an_error():
    rng = np.random.default_rng(0)
    one = _elites()[:1]
    assert [p.genome for p in elite(one, 2, SamplingConfig(), rng)] == ["g00", "g00"]
    with pytest.raises(ValueError, match="empty"):
        uniform([], 2, SamplingConfig(), rng)


def test_official_mapping_is_the_official_codes_formula():
    # official: min_base + (v - min) * max_base / (max - min) with min_base 0.5, max_base 0.8 -> [0.5, 1.3]
    from cycleqd.search.sampling import factor_weights

    feats = np.array([[0.1, 0, 0], [0.9, 4, 4], [0.5, 2, 1]], dtype=float)
    official = factor_weights(feats, SamplingConfig(mapping="official"))
    want = 0.5 + (feats - feats.min(0)) * 0.8 / (feats.max(0) - feats.min(0))
    assert np.allclose(official, want)
    assert official.min() == pytest.approx(0.5) and official.max() == pytest.approx(1.3)
    paper = factor_weights(feats, SamplingConfig(mapping="paper"))
    assert paper.min() == pytest.approx(0.5) and paper.max() == pytest.approx(0.8)
    # a factor every elite shares weighs 1 (the official code's np.ones_like)
    assert np.all(factor_weights(np.array([[0.3, 1], [0.7, 1]]), SamplingConfig(mapping="official"))[:, 1] == 1.0)


def test_official_mapping_draws_with_its_stronger_pressure():
    # all-maximum vs all-minimum elite: (1.3 / 0.5)^3 = 17.6 in single draws (paper: 4.1)
    rng = np.random.default_rng(2)
    cfg = SamplingConfig(mapping="official")
    picks = [elite(_elites(), 1, cfg, rng)[0].genome for _ in range(20000)]
    assert picks.count("g44") / picks.count("g00") == pytest.approx(1.3**3 / 0.5**3, rel=0.15)


def test_unknown_mapping_is_bad_input():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        SamplingConfig(mapping="fast")
