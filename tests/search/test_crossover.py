"""Crossover operators over genomes."""
from __future__ import annotations

import pytest
import torch

from cycleqd.config import CrossoverConfig, MutationConfig
from cycleqd.model.factors import Factors
from cycleqd.model.genome import Genome, materialize
from cycleqd.registry import CROSSOVERS
from cycleqd.search.mutation import svd

TASKS = ("a", "b", "c")


@pytest.fixture(scope="module")
def factors(tiny_family) -> Factors:
    return Factors.build(tiny_family["base"], {t: tiny_family[t] for t in TASKS}, rank=4, progress=False)


def _rel_err(ours: dict, ref: dict) -> float:
    scale = max(float(v.abs().max()) for v in ref.values())
    return max(float((ours[k] - ref[k]).abs().max()) for k in ref) / scale


@pytest.mark.parametrize("name", ["linear", "layerwise"])
class TestCommon:
    def test_registered_and_deterministic(self, name, factors):
        fn = CROSSOVERS.get(name)
        parents = [Genome.seed(0, factors), Genome.seed(1, factors)]
        cfg = CrossoverConfig(sigma=0.1)
        x = fn(parents, cfg, torch.Generator().manual_seed(4), factors)
        y = fn(parents, cfg, torch.Generator().manual_seed(4), factors)
        z = fn(parents, cfg, torch.Generator().manual_seed(5), factors)
        assert torch.equal(x.a, y.a) and torch.equal(x.d, y.d)
        assert not torch.equal(x.a, z.a)

    def test_same_parent_twice_is_the_parent(self, name, factors):
        p = svd(Genome.seed(2, factors), 2, MutationConfig(), torch.Generator().manual_seed(0), factors)
        child = CROSSOVERS.get(name)([p, p], CrossoverConfig(sigma=0.3), torch.Generator().manual_seed(1), factors)
        torch.testing.assert_close(child.a, p.a)
        torch.testing.assert_close(child.d, p.d)

    def test_weights_normalised(self, name, factors):
        parents = [Genome.seed(0, factors), Genome.seed(1, factors)]
        child = CROSSOVERS.get(name)(parents, CrossoverConfig(mu=0.5, sigma=0.2), torch.Generator().manual_seed(2), factors)
        torch.testing.assert_close(child.a.sum(dim=1), torch.ones(factors.num_tensors))

    def test_parents_inputs_untouched(self, name, factors):
        p0, p1 = Genome.seed(0, factors), Genome.seed(1, factors)
        a0 = p0.a.clone()
        CROSSOVERS.get(name)([p0, p1], CrossoverConfig(sigma=0.5), torch.Generator().manual_seed(3), factors)
        assert torch.equal(p0.a, a0)


class TestLinear:
    def test_sigma_zero_is_the_average(self, factors):
        child = CROSSOVERS.get("linear")(
            [Genome.seed(0, factors), Genome.seed(2, factors)], CrossoverConfig(sigma=0.0), torch.Generator(), factors
        )
        want = torch.zeros(factors.num_tensors, 3)
        want[:, 0] = want[:, 2] = 0.5
        assert torch.equal(child.a, want)

    def test_one_weight_for_the_whole_model(self, factors):
        child = CROSSOVERS.get("linear")(
            [Genome.seed(0, factors), Genome.seed(1, factors)], CrossoverConfig(sigma=0.3), torch.Generator().manual_seed(0), factors
        )
        assert torch.unique(child.a[:, 0]).numel() == 1

    def test_matches_official_draw(self, factors):
        cfg = CrossoverConfig(mu=0.1, sigma=0.05)
        child = CROSSOVERS.get("linear")(
            [Genome.seed(0, factors), Genome.seed(1, factors)], cfg, torch.Generator().manual_seed(9), factors
        )
        w = torch.normal(1.0 + cfg.mu, cfg.sigma, size=(2,), generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(child.a[0, :2], w / w.sum())


class TestLayerwise:
    def test_one_weight_pair_per_layer(self, factors):
        child = CROSSOVERS.get("layerwise")(
            [Genome.seed(0, factors), Genome.seed(1, factors)], CrossoverConfig(sigma=0.3), torch.Generator().manual_seed(0), factors
        )
        by_group: dict[int, set] = {}
        for t, g in enumerate(factors.groups):
            by_group.setdefault(g, set()).add(float(child.a[t, 0]))
        assert all(len(v) == 1 for v in by_group.values())
        assert len({next(iter(v)) for v in by_group.values()}) == factors.num_groups

    def test_matches_direct_tensors(self, factors):
        gen = torch.Generator().manual_seed(1)
        p0 = svd(Genome.seed(0, factors), 0, MutationConfig(rate=0.5), gen, factors)
        p1 = Genome.seed(1, factors)
        cfg = CrossoverConfig(sigma=0.2)
        child = CROSSOVERS.get("layerwise")([p0, p1], cfg, torch.Generator().manual_seed(6), factors)
        w = torch.normal(1.0, cfg.sigma, size=(factors.num_groups, 2), generator=torch.Generator().manual_seed(6))
        t0, t1 = materialize(p0, factors), materialize(p1, factors)
        want = {}
        for t, name in enumerate(factors.names):
            w0, w1 = w[factors.groups[t]].tolist()
            base = factors.base[name]
            want[name] = base + (w0 * (t0[name] - base) + w1 * (t1[name] - base)) / (w0 + w1)
        assert _rel_err(materialize(child, factors), want) <= 1e-5
