"""Task vectors, SVD factors and the prepare cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cycleqd.config import ConfigError, parse_config
from cycleqd.model.experts import load_state_dict
from cycleqd.model.factors import Factors, is_svd_weight, prepare_command

TASKS = ("a", "b", "c")


def _config(family: dict, cache: Path, rank: int | None = None):
    return parse_config({
        "models": {"base": str(family["base"]), "experts": {t: str(family[t]) for t in TASKS}},
        "tasks": [{"name": t, "kind": "mini_code"} for t in TASKS],
        "evolution": {"mutation": {"rank": rank}},
        "prepare_cache": str(cache),
    })


@pytest.fixture(scope="module")
def full(tiny_family) -> Factors:
    return Factors.build(tiny_family["base"], {t: tiny_family[t] for t in TASKS}, progress=False)


class TestTaskVectors:
    def test_tau_is_expert_minus_base(self, tiny_family, full):
        base = load_state_dict(tiny_family["base"])
        assert full.names == sorted(base)
        for k, t in enumerate(TASKS):
            expert = load_state_dict(tiny_family[t])
            for name in full.names:
                assert torch.equal(full.tau[name][k], expert[name] - base[name])
                assert torch.equal(full.base[name], base[name])

    def test_svd_weights_are_2d_non_norm(self, full):
        assert "model.embed_tokens.weight" in full.svd_names
        assert "lm_head.weight" in full.svd_names
        assert not any("norm" in n for n in full.svd_names)
        assert set(full.svd_names) == {n for n in full.names if is_svd_weight(n, full.shape(n))}

    def test_full_rank_reconstructs_tau(self, full):
        for name in full.svd_names:
            m, n = full.shape(name)
            assert full.ranks[name] == min(m, n)
            for k in range(full.num_experts):
                u, s, vt = full.svd_of(name, k)
                tau = full.tau[name][k]
                err = (u @ torch.diag(s) @ vt - tau).abs().max() / tau.abs().max()
                assert err < 1e-5, (name, k, float(err))

    def test_truncated_rank_is_top_directions(self, tiny_family):
        f = Factors.build(tiny_family["base"], {t: tiny_family[t] for t in TASKS}, rank=3, progress=False)
        for name in f.svd_names:
            assert f.ranks[name] == 3
            assert f.U[name].shape == (f.shape(name)[0], 3 * 3)
            assert f.Vt[name].shape == (3 * 3, f.shape(name)[1])
            s_full = torch.linalg.svdvals(f.tau[name][1])
            torch.testing.assert_close(f.S[name][1], s_full[:3])
        assert f.d_size == sum(3 * 3 for _ in f.svd_names)

    def test_layer_groups(self, full):
        g = dict(zip(full.names, full.groups))
        assert g["model.layers.0.mlp.up_proj.weight"] == g["model.layers.0.input_layernorm.weight"]
        assert g["model.layers.0.mlp.up_proj.weight"] != g["model.layers.1.mlp.up_proj.weight"]
        assert g["model.embed_tokens.weight"] == g["lm_head.weight"] == g["model.norm.weight"]
        assert full.num_groups == 3


class TestPrepareCache:
    def test_second_prepare_loads_from_cache(self, tiny_family, tmp_path):
        cfg = _config(tiny_family, tmp_path / "cache", rank=4)
        first = Factors.prepare(cfg, progress=False)
        assert first.svd_computed == len(TASKS) * len(first.svd_names) > 0
        cache_file = tmp_path / "cache" / first.key / "svd.safetensors"
        stamp = cache_file.stat().st_mtime_ns
        second = Factors.prepare(cfg, progress=False)
        assert second.svd_computed == 0
        assert second.key == first.key
        assert cache_file.stat().st_mtime_ns == stamp
        for name in first.svd_names:
            assert torch.equal(first.U[name], second.U[name])
            assert torch.equal(first.S[name], second.S[name])
            assert torch.equal(first.Vt[name], second.Vt[name])
        assert second.layout == first.layout

    def test_rank_and_changed_checkpoint_change_the_key(self, tiny_family, tmp_path):
        family = dict(tiny_family)
        first = Factors.prepare(_config(family, tmp_path / "cache", rank=2), progress=False)
        other_rank = Factors.prepare(_config(family, tmp_path / "cache", rank=3), progress=False)
        assert other_rank.key != first.key and other_rank.svd_computed > 0
        # A re-saved expert checkpoint must not be served stale factors.
        import shutil

        family["b"] = tmp_path / "expert_b"
        shutil.copytree(tiny_family["b"], family["b"])
        f = family["b"] / "model.safetensors"
        sd = load_file(str(f))
        sd["model.layers.0.mlp.up_proj.weight"] *= 2
        save_file(sd, str(f), metadata={"format": "pt"})
        changed = Factors.prepare(_config(family, tmp_path / "cache", rank=2), progress=False)
        assert changed.key != first.key and changed.svd_computed > 0
        assert not torch.equal(changed.S["model.layers.0.mlp.up_proj.weight"][1],
                               first.S["model.layers.0.mlp.up_proj.weight"][1])

    def test_prepare_command_returns_cache_folder(self, tiny_family, tmp_path):
        out = prepare_command(_config(tiny_family, tmp_path / "cache", rank=2))
        assert (out / "svd.safetensors").is_file() and (out / "meta.json").is_file()
        assert out.parent == tmp_path / "cache"

    def test_interrupted_cache_is_rebuilt(self, tiny_family, tmp_path):
        cfg = _config(tiny_family, tmp_path / "cache", rank=2)
        key = Factors.prepare(cfg, progress=False).key
        os.remove(tmp_path / "cache" / key / "meta.json")  # as if the write was cut short
        again = Factors.prepare(cfg, progress=False)
        assert again.svd_computed > 0 and (tmp_path / "cache" / key / "meta.json").is_file()

    def test_mismatched_expert_is_config_error(self, tiny_family, tmp_path):
        import shutil

        family = dict(tiny_family)
        family["c"] = tmp_path / "bad"
        shutil.copytree(tiny_family["c"], family["c"])
        f = family["c"] / "model.safetensors"
        sd = load_file(str(f))
        sd["model.norm.weight"] = torch.ones(7)
        save_file(sd, str(f), metadata={"format": "pt"})
        with pytest.raises(ConfigError, match=r"model\.norm\.weight"):
            Factors.prepare(_config(family, tmp_path / "cache"), progress=False)
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


class TestRandomizedSVD:
    def test_matches_exact_top_directions(self, tiny_family):
        experts = {t: tiny_family[t] for t in TASKS}
        exact = Factors.build(tiny_family["base"], experts, rank=2, progress=False)
        fast = Factors.build(tiny_family["base"], experts, rank=2, progress=False, svd_method="randomized")
        assert fast.layout == exact.layout
        for name in exact.svd_names:
            for k in range(3):
                ue, se, ve = exact.svd_of(name, k)
                uf, sf, vf = fast.svd_of(name, k)
                torch.testing.assert_close(sf, se, rtol=1e-4, atol=0)
                want = ue @ torch.diag(se) @ ve
                err = (uf @ torch.diag(sf) @ vf - want).abs().max() / want.abs().max()
                assert err < 1e-4, (name, k, float(err))

    def test_needs_rank_and_known_name(self, tiny_family):
        experts = {t: tiny_family[t] for t in TASKS}
        with pytest.raises(ValueError, match="rank"):
            Factors.build(tiny_family["base"], experts, progress=False, svd_method="randomized")
        with pytest.raises(ValueError, match="svd_method"):
            Factors.build(tiny_family["base"], experts, rank=2, progress=False, svd_method="magic")


def test_full_rank_stores_one_side(tiny_family):
    """At full rank tau = U diag(S) V^T: only the short side's basis is stored, the other is derived."""
    experts = {t: tiny_family[t] for t in ("a", "b", "c")}
    full = Factors.build(tiny_family["base"], experts, rank=None, progress=False)
    for name in full.svd_names:
        m, n = full.shape(name)
        assert not full.stores_both_sides(name)
        assert (name in full.U) == (m <= n) and (name in full.Vt) == (m > n)
        for k in range(3):
            u, s, vt = full.svd_of(name, k)
            torch.testing.assert_close(u @ torch.diag(s) @ vt, full.tau[name][k], atol=1e-5, rtol=1e-4)
    both = sum(full.tau[n].numel() + 3 * min(full.shape(n)) * sum(full.shape(n)) for n in full.svd_names)
    held = sum(full.tau[n].numel() + full.U.get(n, full.Vt.get(n)).numel() for n in full.svd_names)
    assert held < both
