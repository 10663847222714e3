"""Genomes: seeds, combination, storage, and materialisation checked against direct tensor arithmetic."""
from __future__ import annotations

import random

import pytest
import torch

from cycleqd.config import CrossoverConfig, MutationConfig
from cycleqd.model.experts import load_state_dict
from cycleqd.model.factors import Factors
from cycleqd.model.genome import DeltaTerm, Genome, NoiseTerm, materialize
from cycleqd.search.crossover import linear
from cycleqd.search.mutation import gaussian, svd

TASKS = ("a", "b", "c")


@pytest.fixture(scope="module", params=[None, 3], ids=["full_rank", "rank3"])
def factors(request, tiny_family) -> Factors:
    return Factors.build(
        tiny_family["base"], {t: tiny_family[t] for t in TASKS}, rank=request.param, progress=False
    )


@pytest.fixture(scope="module")
def reference(tiny_family) -> dict:
    """Base and task vectors in fp32 straight from transformers, as the official code gets them."""
    from transformers import AutoModelForCausalLM

    def sd(p):
        return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).state_dict().items()}

    base = sd(tiny_family["base"])
    taus = []
    for t in TASKS:
        e = sd(tiny_family[t])
        taus.append({k: e[k] - base[k] for k in base})
    return {"base": base, "taus": taus}


def _rel_err(ours: dict, ref: dict) -> float:
    scale = max(float(v.abs().max()) for v in ref.values())
    return max(float((ours[k] - ref[k]).abs().max()) for k in ref) / scale


class TestExactness:
    """A genome built by a chain of operators equals the same operators applied to full tensors."""

    def test_chain_matches_direct_tensors(self, factors, reference):
        rank = factors.rank
        base, taus = reference["base"], reference["taus"]
        svd_names = sorted(n for n, v in base.items() if v.ndim == 2 and "norm" not in n)
        # Fresh SVDs of each expert's task vector, independent of the factors.
        fresh = {}
        for k, tau in enumerate(taus):
            for n in svd_names:
                u, s, vh = torch.linalg.svd(tau[n], full_matrices=False)
                r = min(s.numel(), rank or s.numel())
                fresh[k, n] = (u[:, :r], s[:r], vh[:r])

        ccfg = CrossoverConfig(mu=0.0, sigma=0.2)
        mcfg = MutationConfig(rate=0.5)
        gen_ours = torch.Generator().manual_seed(123)
        gen_ref = torch.Generator().manual_seed(123)
        pick = random.Random(7)
        pool_g = [Genome.seed(k, factors) for k in range(3)]
        pool_t = [dict(t) for t in taus]
        steps = 0
        for step in range(24):
            kind = pick.choice(["both", "both", "crossover", "mutation"])
            q = pick.randrange(3)
            i, j = pick.sample(range(len(pool_g)), 2)
            g, t = pool_g[i], pool_t[i]
            if kind in ("both", "crossover"):
                g = linear([pool_g[i], pool_g[j]], ccfg, gen_ours, factors)
                w = torch.normal(1.0 + ccfg.mu, ccfg.sigma, size=(2,), generator=gen_ref)
                w1, w2 = float(w[0]), float(w[1])
                t = {n: (w1 * pool_t[i][n] + w2 * pool_t[j][n]) / (w1 + w2) for n in base}
                steps += 1
            if kind in ("both", "mutation"):
                g = svd(g, q, mcfg, gen_ours, factors)
                t = dict(t)
                for n in svd_names:
                    u, s, vh = fresh[q, n]
                    r = torch.rand(s.numel(), generator=gen_ref) * mcfg.rate
                    t[n] = t[n] + u @ torch.diag(r * s) @ vh
                steps += 1
            pool_g.append(g)
            pool_t.append(t)
        assert steps >= 20
        ours = materialize(pool_g[-1], factors)
        ref = {n: base[n] + pool_t[-1][n] for n in base}
        err = _rel_err(ours, ref)
        print(f"exactness rank={rank}: max error {err:.3e} of the weights' scale")
        assert err <= 1e-5
        # The chain went somewhere: the last child is none of the experts.
        for k in range(3):
            assert _rel_err(ours, {n: base[n] + taus[k][n] for n in base}) > 1e-3
        # Every model in the pool matches, not only the last.
        for g, t in zip(pool_g[3::5], pool_t[3::5]):
            assert _rel_err(materialize(g, factors), {n: base[n] + t[n] for n in base}) <= 1e-5


class TestMaterialize:
    def test_seed_is_the_expert(self, factors, tiny_family):
        for k, task in enumerate(TASKS):
            ours = materialize(Genome.seed(k, factors), factors)
            expert = load_state_dict(tiny_family[task])
            assert _rel_err(ours, expert) <= 1e-6

    def test_base_genome_is_the_base(self, factors, tiny_family):
        assert _rel_err(materialize(Genome.base(factors), factors), load_state_dict(tiny_family["base"])) == 0.0

    def test_into_model_in_place(self, factors, tiny_family):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_family["base"], dtype=torch.float32)
        state = model.state_dict()
        ptrs = {k: v.data_ptr() for k, v in state.items()}
        g = svd(Genome.seed(1, factors), 1, MutationConfig(), torch.Generator().manual_seed(0), factors)
        returned = materialize(g, factors, into=state)
        assert returned is state
        assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs
        want = materialize(g, factors)
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), want[name])

    def test_into_other_dtype(self, factors, tiny_family):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_family["base"], dtype=torch.bfloat16)
        g = Genome.seed(2, factors)
        materialize(g, factors, into=model.state_dict())
        want = materialize(g, factors, dtype=torch.bfloat16)
        for name, p in model.named_parameters():
            assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), want[name])

    def test_into_missing_tensor(self, factors):
        state = materialize(Genome.seed(0, factors), factors)
        state.pop("model.norm.weight")
        with pytest.raises(KeyError, match=r"model\.norm\.weight"):
            materialize(Genome.seed(0, factors), factors, into=state)

    def test_tied_embeddings_follow(self, tmp_path):
        from tiny_models import make_tiny_family
        from transformers import AutoModelForCausalLM

        fam = make_tiny_family(tmp_path, tasks=("x", "y"), tie_embeddings=True)
        f = Factors.build(fam["base"], {"x": fam["x"], "y": fam["y"]}, progress=False)
        assert "lm_head.weight" not in f.names
        model = AutoModelForCausalLM.from_pretrained(fam["base"], dtype=torch.float32)
        materialize(Genome.seed(1, f), f, into=model.state_dict())
        expert = AutoModelForCausalLM.from_pretrained(fam["y"], dtype=torch.float32)
        ids = torch.tensor([[3, 4, 5, 6]])
        torch.testing.assert_close(model(ids).logits, expert(ids).logits, rtol=0, atol=1e-5)

    def test_other_factors_rejected(self, factors, tiny_family):
        other = Factors.build(tiny_family["base"], {"a": tiny_family["a"], "b": tiny_family["b"]}, progress=False)
        with pytest.raises(ValueError, match="layout"):
            materialize(Genome.seed(0, other), factors)


class TestCombineAndTerms:
    def test_combine_is_weighted_sum(self, factors):
        seeds = [Genome.seed(k, factors) for k in range(3)]
        merged = Genome.combine(seeds, [0.2, 0.3, 0.5])
        ours = materialize(merged, factors)
        want = {n: factors.base[n] + 0.2 * factors.tau[n][0] + 0.3 * factors.tau[n][1] + 0.5 * factors.tau[n][2]
                for n in factors.names}
        assert _rel_err(ours, want) <= 1e-6

    def test_combine_rejects_mixed_layouts(self, factors, tiny_family):
        other = Factors.build(tiny_family["base"], {"a": tiny_family["a"], "b": tiny_family["b"]}, progress=False)
        with pytest.raises(ValueError, match="layouts"):
            Genome.combine([Genome.seed(0, factors), Genome.seed(0, other)], [0.5, 0.5])

    def test_delta_term(self, factors):
        name = "model.layers.0.self_attn.o_proj.weight"
        delta = {name: torch.randn(factors.shape(name), generator=torch.Generator().manual_seed(1))}
        g = Genome.seed(0, factors).with_term(DeltaTerm.create(delta, factors))
        ours = materialize(g, factors)
        plain = materialize(Genome.seed(0, factors), factors)
        torch.testing.assert_close(ours[name], plain[name] + delta[name])
        other = "model.layers.1.self_attn.o_proj.weight"
        assert torch.equal(ours[other], plain[other])
        # Crossing with itself keeps one term with the weights summed.
        half = Genome.combine([g, g], [0.5, 0.5])
        assert len(half.terms) == 1
        torch.testing.assert_close(materialize(half, factors)[name], ours[name])

    def test_noise_terms_cancel_and_merge(self, factors):
        g = gaussian(Genome.seed(0, factors), 0, MutationConfig(std=1e-2), torch.Generator().manual_seed(5), factors)
        assert isinstance(g.terms[0], NoiseTerm)
        neg = Genome.combine([g, Genome.seed(0, factors), g], [1.0, 1.0, -1.0])
        assert neg.terms == ()
        assert _rel_err(materialize(neg, factors), materialize(Genome.seed(0, factors), factors)) == 0.0


class TestStorage:
    def _genome(self, factors) -> Genome:
        gen = torch.Generator().manual_seed(3)
        g = linear([Genome.seed(0, factors), Genome.seed(2, factors)], CrossoverConfig(sigma=0.1), gen, factors)
        g = svd(g, 2, MutationConfig(), gen, factors)
        g = gaussian(g, 2, MutationConfig(), gen, factors)
        name = "model.layers.1.mlp.down_proj.weight"
        return g.with_term(DeltaTerm.create({name: torch.ones(factors.shape(name))}, factors))

    def test_bytes_round_trip(self, factors):
        g = self._genome(factors)
        back = Genome.from_bytes(g.to_bytes())
        assert torch.equal(back.a, g.a) and torch.equal(back.d, g.d) and back.layout == g.layout
        assert [t.identity for t in back.terms] == [t.identity for t in g.terms]
        for x, y in zip(back.terms, g.terms):
            assert torch.equal(x.coef, y.coef)
        assert _rel_err(materialize(back, factors), materialize(g, factors)) == 0.0

    def test_save_load(self, factors, tmp_path):
        g = self._genome(factors)
        g.save(tmp_path / "g.safetensors")
        back = Genome.load(tmp_path / "g.safetensors")
        assert _rel_err(materialize(back, factors), materialize(g, factors)) == 0.0
        assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]

    def test_one_genome_always_has_the_same_bytes(self, factors, tmp_path):
        """The header is written with sorted keys, so reruns leave committed genomes byte-identical."""
        import subprocess
        import sys

        from safetensors import safe_open

        g = self._genome(factors)
        blobs = {g.to_bytes() for _ in range(8)}
        g.save(tmp_path / "g.safetensors")
        # another process, another hash seed: the same genome read back and written again
        code = ("import sys; from cycleqd.model.genome import Genome; "
                "sys.stdout.buffer.write(Genome.load(sys.argv[1]).to_bytes())")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "g.safetensors")], capture_output=True,
                             check=True).stdout
        assert len(blobs | {out}) == 1
        with safe_open(tmp_path / "g.safetensors", "pt") as f:  # still a standard safetensors file
            assert f.metadata()["layout"] == g.layout and torch.equal(f.get_tensor("a"), g.a.float())

    def test_not_a_genome(self, tmp_path):
        from safetensors.torch import save

        with pytest.raises(ValueError, match="not a genome"):
            Genome.from_bytes(save({"x": torch.zeros(2)}))
        with pytest.raises(ValueError, match="not a genome"):
            Genome.from_bytes(b"abc")

    def test_linear_genome_is_small(self, factors):
        gen = torch.Generator().manual_seed(0)
        g = svd(linear([Genome.seed(0, factors), Genome.seed(1, factors)], CrossoverConfig(), gen, factors), 0,
                MutationConfig(), gen, factors)
        g = gaussian(g, 0, MutationConfig(), gen, factors)
        assert g.nbytes == (factors.num_tensors * 3 + factors.d_size + factors.num_tensors) * 4
        assert len(g.to_bytes()) < g.nbytes + 2048


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_core.py"
    spec = importlib.util.spec_from_file_location("bench_core_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY_ARCH = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, vocab_size=64,
                 num_attention_heads=4, num_key_value_heads=2)


class TestAgainstCheckpointPath:
    """The genome path of the core benchmark makes the same child as the official checkpoint path."""

    def test_cpu(self, tmp_path):
        res = _bench_module()._measure(TINY_ARCH, device="cpu", dtype=torch.float32, repeats=1, workdir=tmp_path)
        assert res["max_weight_diff_vs_reference"] <= 1e-5
        assert res["checkpoint_bytes_read_per_child"]["ours"] == 0
        assert res["checkpoint_bytes_read_per_child"]["reference"] == 2 * res["checkpoint_bytes"] > 0
        assert res["genome_storage_ratio"] > 1

    @pytest.mark.gpu
    def test_gpu(self, tmp_path):
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        res = _bench_module()._measure(TINY_ARCH, device="cuda", dtype=torch.bfloat16, repeats=1, workdir=tmp_path)
        assert res["max_weight_diff_vs_reference"] <= 2e-2  # bfloat16 rounding
        assert res["checkpoint_bytes_read_per_child"]["ours"] == 0


@pytest.mark.gpu
def test_materialize_on_cuda_matches_cpu(tiny_family):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    experts = {t: tiny_family[t] for t in TASKS}
    cpu = Factors.build(tiny_family["base"], experts, rank=4, progress=False)
    gpu = Factors.build(tiny_family["base"], experts, rank=4, progress=False, device="cuda")
    gen = torch.Generator().manual_seed(0)
    g = svd(linear([Genome.seed(0, cpu), Genome.seed(1, cpu)], CrossoverConfig(sigma=0.1), gen, cpu), 2,
            MutationConfig(), gen, cpu)
    on_gpu = materialize(g, gpu)
    assert all(v.device.type == "cuda" for v in on_gpu.values())
    assert _rel_err({k: v.cpu() for k, v in on_gpu.items()}, materialize(g, cpu)) <= 1e-5
