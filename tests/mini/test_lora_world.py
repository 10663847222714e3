"""The mini world's LoRA experts: PEFT adapters trained from the base, usable as experts and reused once built."""
from __future__ import annotations

import json

import torch

from cycleqd.mini.build import build_lora_experts, build_mini_world, lora_dir
from cycleqd.mini.skills import SKILLS
from cycleqd.model.adapters import read_experts
from cycleqd.model.factors import Factors
from cycleqd.model.genome import Genome, materialize


def test_lora_experts_train_from_the_base_and_merge_exactly(tmp_path):
    """`mini build --experts lora`: one adapter per skill, trained (nonzero B), checked against the base, and
    expert k's seed genome materialises to PEFT's own merge of adapter k."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    world = build_mini_world(tmp_path / "w", size="tiny", progress=False)
    build_lora_experts(world, size="tiny", progress=False)
    stamp = (world / "lora_manifest.json").stat().st_mtime_ns
    build_lora_experts(world, size="tiny", progress=False)  # a finished build is reused
    assert (world / "lora_manifest.json").stat().st_mtime_ns == stamp
    experts = {s: str(lora_dir(world, s)) for s in SKILLS}
    _, adapters = read_experts(str(world / "base"), experts)
    for s, ad in adapters.items():
        assert json.loads((lora_dir(world, s) / "adapter_config.json").read_text())["r"] == 8
        assert any(float(m.B.abs().max()) > 0 for m in ad.modules.values()), f"{s}: the adapter did not train"
    f = Factors.from_adapters(world / "base", experts)
    ours = materialize(Genome.seed(1, f), f)
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(world / "base"), dtype=torch.float32),
                                       experts[list(SKILLS)[1]]).merge_and_unload().state_dict()
    for name, w in ours.items():
        torch.testing.assert_close(w, merged[name], rtol=0, atol=1e-5, msg=name)
