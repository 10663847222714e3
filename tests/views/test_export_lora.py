"""A run over LoRA experts, end to end in process, exported as a PEFT adapter folder and as full weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mini_run import make_lora_run

SPECS = {
    "code": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "sql": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "o_proj", "up_proj"], "use_rslora": True},
    "shell": {"r": 3, "lora_alpha": 6, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, small_world: Path) -> Path:
    """Three generations over three LoRA experts of the small mini world's base (no Ray)."""
    return make_lora_run(tmp_path_factory.mktemp("lora_run"), small_world, SPECS, seed=4, generations=3)


def test_lora_run_exports_an_adapter_peft_loads(lora_run, tmp_path):
    """The best child exports as a PEFT LoRA folder; PeftModel loads it and matches the --dense export's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cycleqd.runs.store import RunStore
    from cycleqd.views.export import export

    store = RunStore(lora_run)
    assert store.genome_problem("seed_code") is None  # genomes checked against the LoRA layout
    ad = export(lora_run, best="mean", out=tmp_path / "adapter")
    dense = export(lora_run, best="mean", out=tmp_path / "dense", dense=True)
    assert (ad / "adapter_config.json").is_file() and not (ad / "model.safetensors").exists()
    assert (dense / "model.safetensors").is_file() or (dense / "model.safetensors.index.json").is_file()
    card = (ad / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card
    assert "library_name: transformers" in (dense / "README.md").read_text()
    base = json.loads((ad / "adapter_config.json").read_text())["base_model_name_or_path"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(ad))
    full = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32)
    ids = torch.tensor([[1, 7, 12, 30, 5, 9, 22]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(ids).logits, full.eval()(ids).logits, rtol=0, atol=1e-4)
