"""Loading base/expert checkpoints and checking that they can be merged."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_family

from cycleqd.config import ConfigError
from cycleqd.model.experts import check_compatible, inspect_model, load_state_dict, weight_files


def _hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def _copy_with(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f), metadata={"format": "pt"})
    return dst


class TestLoad:
    def test_matches_transformers(self, tiny_family):
        ours = load_state_dict(tiny_family["a"])
        ref = _hf_state_dict(tiny_family["a"])
        assert set(ours) == set(ref)
        for name, t in ours.items():
            assert t.dtype == torch.float32
            torch.testing.assert_close(t, ref[name], rtol=0, atol=0)

    def test_dtype(self, tiny_family):
        sd = load_state_dict(tiny_family["base"], "bfloat16")
        assert all(t.dtype == torch.bfloat16 for t in sd.values())

    def test_sharded(self, tiny_family, tmp_path):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_family["b"], dtype=torch.float32)
        model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
        assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
        assert len(weight_files(tmp_path / "sharded")) > 1
        ours = load_state_dict(tmp_path / "sharded")
        ref = load_state_dict(tiny_family["b"])
        assert set(ours) == set(ref)
        for name in ref:
            assert torch.equal(ours[name], ref[name])

    def test_no_weights_is_config_error(self, tmp_path):
        (tmp_path / "config.json").write_text("{}")
        with pytest.raises(ConfigError, match="safetensors"):
            load_state_dict(tmp_path)

    def test_bad_path_or_hub_id_is_config_error(self, tmp_path):
        with pytest.raises(ConfigError, match="not a folder"):
            load_state_dict(str(tmp_path / "no" / "such" / "model"))


class TestCompatible:
    def test_family_is_compatible(self, tiny_family):
        base = inspect_model(tiny_family["base"])
        check_compatible(base, {t: inspect_model(tiny_family[t]) for t in ("a", "b", "c")})

    def test_shape_mismatch_names_tensor(self, tiny_family, tmp_path):
        name = "model.layers.1.mlp.up_proj.weight"

        def edit(sd):
            sd[name] = sd[name][:-1].contiguous()

        bad = _copy_with(tiny_family["a"], tmp_path / "bad", edit)
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")) as e:
            check_compatible(inspect_model(tiny_family["base"]), {"a": inspect_model(bad)})
        assert "shape" in str(e.value) and "'a'" in str(e.value)

    def test_missing_tensor_names_tensor(self, tiny_family, tmp_path):
        name = "model.layers.0.self_attn.k_proj.weight"
        bad = _copy_with(tiny_family["b"], tmp_path / "bad", lambda sd: sd.pop(name))
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
            check_compatible(inspect_model(tiny_family["base"]), {"b": inspect_model(bad)})

    def test_config_mismatch(self, tiny_family, tmp_path):
        bad = tmp_path / "bad"
        shutil.copytree(tiny_family["c"], bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg["num_hidden_layers"] = 3
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigError, match="num_hidden_layers"):
            check_compatible(inspect_model(tiny_family["base"]), {"c": inspect_model(bad)})

    def test_tied_embeddings(self, tmp_path, tiny_family):
        tied = make_tiny_family(tmp_path / "tied", tasks=("x",), tie_embeddings=True)
        info = inspect_model(tied["x"])
        assert "lm_head.weight" not in info.shapes
        check_compatible(inspect_model(tied["base"]), {"x": info})
        # An untied base against tied experts cannot be merged: the error names the head.
        with pytest.raises(ConfigError, match=r"lm_head\.weight"):
            check_compatible(inspect_model(tiny_family["base"]), {"x": inspect_model(tied["x"])})
