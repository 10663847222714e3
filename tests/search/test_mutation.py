"""Mutation operators over genomes."""
from __future__ import annotations

import pytest
import torch

from cycleqd.config import MutationConfig
from cycleqd.model.factors import Factors
from cycleqd.model.genome import Genome, NoiseTerm, materialize
from cycleqd.registry import MUTATIONS

TASKS = ("a", "b", "c")


@pytest.fixture(scope="module")
def factors(tiny_family) -> Factors:
    return Factors.build(tiny_family["base"], {t: tiny_family[t] for t in TASKS}, progress=False)


class TestSVD:
    def test_moves_only_expert_q_within_rate(self, factors):
        g = Genome.seed(0, factors)
        cfg = MutationConfig(rate=0.1)
        m = MUTATIONS.get("svd")(g, 2, cfg, torch.Generator().manual_seed(0), factors)
        assert torch.equal(m.a, g.a)
        K = factors.num_experts
        for name in factors.svd_names:
            r = factors.ranks[name]
            block = m.d[factors.d_slices[name]].view(K, r)
            assert torch.equal(block[:2], torch.zeros(2, r))
            ratio = block[2] / factors.S[name][2]
            assert bool((ratio >= 0).all()) and bool((ratio < cfg.rate).all())
            assert float(ratio.std()) > 0  # elementwise draws, not one scalar

    def test_adds_expert_directions_to_weights(self, factors):
        g = Genome.seed(1, factors)
        m = MUTATIONS.get("svd")(g, 0, MutationConfig(rate=0.1), torch.Generator().manual_seed(1), factors)
        before, after = materialize(g, factors), materialize(m, factors)
        gen = torch.Generator().manual_seed(1)
        for name in factors.names:
            if name not in factors.d_slices:
                assert torch.equal(before[name], after[name])  # norms untouched
                continue
            u, s, vh = torch.linalg.svd(factors.tau[name][0], full_matrices=False)
            r = torch.rand(s.numel(), generator=gen) * 0.1
            torch.testing.assert_close(after[name] - before[name], u @ torch.diag(r * s) @ vh, rtol=0, atol=1e-6)

    def test_deterministic_and_pure(self, factors):
        g = Genome.seed(0, factors)
        fn = MUTATIONS.get("svd")
        x = fn(g, 1, MutationConfig(), torch.Generator().manual_seed(2), factors)
        y = fn(g, 1, MutationConfig(), torch.Generator().manual_seed(2), factors)
        assert torch.equal(x.d, y.d) and not torch.equal(x.d, g.d)
        assert torch.equal(g.d, torch.zeros(factors.d_size))

    def test_bad_q(self, factors):
        with pytest.raises(IndexError):
            MUTATIONS.get("svd")(Genome.seed(0, factors), 3, MutationConfig(), torch.Generator(), factors)


class TestGaussian:
    def test_noise_has_std_on_every_tensor(self, factors):
        g = Genome.seed(0, factors)
        cfg = MutationConfig(std=3e-3)
        m = MUTATIONS.get("gaussian")(g, 0, cfg, torch.Generator().manual_seed(0), factors)
        assert len(m.terms) == 1 and isinstance(m.terms[0], NoiseTerm)
        assert torch.equal(m.a, g.a) and torch.equal(m.d, g.d)
        before, after = materialize(g, factors), materialize(m, factors)
        diffs = torch.cat([(after[n] - before[n]).flatten() for n in factors.names])
        assert abs(float(diffs.std()) - cfg.std) < 0.05 * cfg.std
        assert abs(float(diffs.mean())) < 0.05 * cfg.std
        assert all(not torch.equal(after[n], before[n]) for n in factors.names)

    def test_reproducible_from_seed(self, factors):
        fn = MUTATIONS.get("gaussian")
        g = Genome.seed(1, factors)
        x = materialize(fn(g, 0, MutationConfig(), torch.Generator().manual_seed(3), factors), factors)
        y = materialize(fn(g, 0, MutationConfig(), torch.Generator().manual_seed(3), factors), factors)
        z = materialize(fn(g, 0, MutationConfig(), torch.Generator().manual_seed(4), factors), factors)
        name = factors.names[0]
        assert torch.equal(x[name], y[name]) and not torch.equal(x[name], z[name])

    def test_genome_stays_compact(self, factors):
        g = Genome.seed(0, factors)
        m = MUTATIONS.get("gaussian")(g, 0, MutationConfig(), torch.Generator().manual_seed(0), factors)
        assert m.nbytes - g.nbytes == factors.num_tensors * 4
