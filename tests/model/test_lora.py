"""LoRA experts: the QR-route SVD, LoRA factors against dense factors of the merged adapters, and
children as exact LoRA adapters that PEFT loads."""
from __future__ import annotations

import json

import pytest
import torch

from cycleqd.config import ConfigError, CrossoverConfig, MutationConfig
from cycleqd.model.factors import Factors
from cycleqd.model.genome import Genome, materialize
from cycleqd.model.adapters import LoraAdapter, lora_svd, read_experts
from cycleqd.model.lora import child_adapter, save_adapter
from cycleqd.search.crossover import layerwise, linear
from cycleqd.search.mutation import gaussian, svd
from tiny_models import make_lora_experts

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Two expert sets: mixed ranks, alphas, targets and rsLoRA; and one uniform all-linear set with rsLoRA.
SETS = {
    "mixed": {
        "a": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "b": {"r": 4, "lora_alpha": 16, "target_modules": ALL},
        "c": {"r": 3, "lora_alpha": 5, "target_modules": ["down_proj", "q_proj"], "use_rslora": True},
    },
    "uniform_rslora": {
        "a": {"r": 8, "lora_alpha": 8, "target_modules": ALL, "use_rslora": True},
        "b": {"r": 8, "lora_alpha": 32, "target_modules": ALL, "use_rslora": True},
    },
}


@pytest.fixture(scope="module", params=list(SETS))
def lora_world(request, tiny_family, tmp_path_factory):
    """LoRA factors and dense factors of the same experts merged into full models (rank = the largest r)."""
    specs = SETS[request.param]
    experts = make_lora_experts(tiny_family["base"], tmp_path_factory.mktemp(request.param), specs, seed=3)
    lora = Factors.from_adapters(tiny_family["base"], {t: p["adapter"] for t, p in experts.items()})
    dense = Factors.build(tiny_family["base"], {t: p["merged"] for t, p in experts.items()},
                          rank=max(s["r"] for s in specs.values()), progress=False)
    return {"lora": lora, "dense": dense, "experts": experts, "base": tiny_family["base"], "specs": specs}


def _to_dense(genome: Genome, lora: Factors, dense: Factors) -> Genome:
    """The same genome over dense factors: a as is, each module's d block in the first columns."""
    d = torch.zeros(dense.d_size)
    K = lora.num_experts
    for name in lora.svd_names:
        r, R = lora.ranks[name], dense.ranks[name]
        d[dense.d_slices[name]].view(K, R)[:, :r] = genome.d[lora.d_slices[name]].view(K, r)
    return Genome(a=genome.a.clone(), d=d, layout=dense.layout)


def _random_genomes(f: Factors, n: int, seed: int) -> list[Genome]:
    gen = torch.Generator().manual_seed(seed)
    pool = [Genome.seed(k, f) for k in range(f.num_experts)]
    out = []
    for i in range(n):
        op = linear if i % 2 else layerwise
        idx = torch.randperm(len(pool), generator=gen)[:2].tolist()
        child = op([pool[j] for j in idx], CrossoverConfig(mu=0.1, sigma=0.4), gen, f)
        child = svd(child, i % f.num_experts, MutationConfig(rate=0.5), gen, f)
        pool.append(child)
        out.append(child)
    return out


def test_qr_route_svd_matches_dense_svd():
    """The SVD of s B A from QRs of B and A^T and an r x r SVD equals torch's SVD of the dense product."""
    gen = torch.Generator().manual_seed(0)
    for m, n, r, scale in [(48, 32, 1, 2.0), (64, 40, 4, 0.5), (40, 96, 8, 16 / 8**0.5), (33, 33, 16, 1.0)]:
        B, A = torch.randn(m, r, generator=gen), torch.randn(r, n, generator=gen)
        dense = scale * B.double() @ A.double()
        u, s, vt = lora_svd(B, A, scale)
        U, S, Vt = torch.linalg.svd(dense, full_matrices=False)
        assert u.shape == (m, r) and vt.shape == (r, n)
        torch.testing.assert_close(s.double(), S[:r], rtol=1e-5, atol=1e-5 * float(S[0]))
        torch.testing.assert_close((u * s) @ vt, dense.float(), rtol=0, atol=1e-5 * float(dense.abs().max()))
        # Same singular directions up to sign (random spectra have distinct values).
        torch.testing.assert_close((u.double() * U[:, :r]).sum(0).abs(), torch.ones(r, dtype=torch.float64),
                                   rtol=0, atol=1e-4)
        torch.testing.assert_close((vt.double() * Vt[:r]).sum(1).abs(), torch.ones(r, dtype=torch.float64),
                                   rtol=0, atol=1e-4)


def test_lora_factors_are_small_and_exact(lora_world):
    """No dense task vector is stored; each expert's factors give s B A on what it targets and zero elsewhere."""
    lora, specs = lora_world["lora"], lora_world["specs"]
    assert lora.tau == {} and lora.low_rank
    for k, (task, paths) in enumerate(lora_world["experts"].items()):
        ad = LoraAdapter.read(paths["adapter"])
        for name in lora.svd_names:
            u, s, vt = lora.svd_of(name, k)
            got = (u * s) @ vt
            mod = ad.modules.get(name)
            if mod is None:
                assert float(got.abs().max()) == 0.0, f"{task} does not target {name}"
                continue
            alpha, r = specs[task]["lora_alpha"], specs[task]["r"]
            scale = alpha / r**0.5 if specs[task].get("use_rslora") else alpha / r
            assert mod.scale == pytest.approx(scale)
            torch.testing.assert_close(got, scale * mod.B @ mod.A, rtol=0, atol=1e-5)
    dense_tau = lora_world["dense"].tau
    assert lora.nbytes() < sum(t.numel() * t.element_size() for t in dense_tau.values())


def test_child_adapter_equals_dense_materialisation(lora_world):
    """Random genomes (crossover + SVD mutation): base + the child's B A equals the dense factors'
    materialisation of the same genome over the merged experts, to fp32 tolerance."""
    lora, dense = lora_world["lora"], lora_world["dense"]
    for genome in [Genome.seed(0, lora), *_random_genomes(lora, 6, seed=1)]:
        ref = materialize(_to_dense(genome, lora, dense), dense)
        ours = materialize(genome, lora)
        adapter = child_adapter(genome, lora)
        scale = max(float(w.abs().max()) for w in ref.values())
        for name, w in ref.items():
            via_adapter = lora.base[name] + adapter.delta(name) if name in adapter.modules else lora.base[name]
            torch.testing.assert_close(via_adapter, w, rtol=0, atol=2e-5 * scale, msg=name)
            torch.testing.assert_close(ours[name], w, rtol=0, atol=2e-5 * scale, msg=name)
        assert adapter.rank <= sum(s["r"] for s in lora_world["specs"].values())


def test_shared_child_adapters_have_one_a_per_module_and_the_same_delta(lora_world):
    """With ``shared`` every direction is kept (zero coefficients too, as a seed's or an early child's):
    all children's ``A`` is the same matrix per module, so an engine shrinks all their rows at once; the
    delta equals the smallest adapter's."""
    lora = lora_world["lora"]
    genomes = [Genome.seed(0, lora), Genome.seed(1, lora), *_random_genomes(lora, 4, seed=3)]
    small = [child_adapter(g, lora) for g in genomes]
    shared = [child_adapter(g, lora, shared=True) for g in genomes]
    assert any(a.rank < shared[0].rank for a in small)  # the seeds' zero directions were dropped there
    for name, (_, A) in shared[0].modules.items():
        for other in shared[1:]:
            assert torch.equal(other.modules[name][1], A), name
        for s, a in zip(shared, small):
            if name in a.modules:
                torch.testing.assert_close(s.delta(name), a.delta(name), rtol=0, atol=1e-6)
            else:
                assert float(s.delta(name).abs().max()) == 0.0


def test_child_adapter_loads_in_peft(lora_world, tmp_path):
    """A child saved as a PEFT folder loads with PeftModel.from_pretrained and gives the dense child's logits."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    lora = lora_world["lora"]
    genome = _random_genomes(lora, 3, seed=7)[-1]
    out = save_adapter(child_adapter(genome, lora), tmp_path / "child", base_model=str(lora_world["base"]))
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    base = LlamaForCausalLM.from_pretrained(str(lora_world["base"]), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    dense = LlamaForCausalLM.from_pretrained(str(lora_world["base"]), dtype=torch.float32).eval()
    materialize(genome, lora, into=dict(dense.named_parameters()))
    ids = torch.tensor([[1, 5, 9, 13, 20, 7]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, dense(ids).logits, rtol=0, atol=1e-4)
    # The saved adapter reads back as an expert with the same deltas.
    again = LoraAdapter.read(out)
    for name, (B, A) in child_adapter(genome, lora).modules.items():
        torch.testing.assert_close(again.modules[name].scale * again.modules[name].B @ again.modules[name].A,
                                   B @ A, rtol=0, atol=1e-6)


def test_non_low_rank_children_are_refused(lora_world):
    """A child with a Gaussian-noise term is not an adapter: child_adapter says so (dense factors too)."""
    lora = lora_world["lora"]
    noisy = gaussian(Genome.seed(0, lora), 0, MutationConfig(std=1e-3), torch.Generator().manual_seed(0), lora)
    with pytest.raises(ValueError, match="noise terms"):
        child_adapter(noisy, lora)
    with pytest.raises(ValueError, match="only over LoRA experts"):
        child_adapter(Genome.seed(0, lora_world["dense"]), lora_world["dense"])


def test_adapter_of_another_base_is_refused(lora_world, tmp_path):
    """An adapter whose base_model_name_or_path names another model is refused with one line."""
    src = lora_world["experts"]["a"]["adapter"]
    bad = tmp_path / "other"
    bad.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/Other-Model-7B"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    (bad / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="trained on 'someone/Other-Model-7B'") as e:
        read_experts(str(lora_world["base"]), {"a": str(bad)})
    assert "\n" not in str(e.value)
