"""LoRA experts of the mini world: one PEFT adapter per skill, trained from the same base.

``cycleqd mini build --experts lora`` (or ``models.mini.experts: lora``) trains, beside the
dense experts, ``dir/lora_{code,sql,shell}``: PEFT LoRA folders (rank 8 on every linear module,
alpha 16) trained on the same data as the dense experts, with only the adapters learning
(a 10x higher learning rate, as LoRA fine-tunes use). ``dir/lora_manifest.json`` records the
recipe; a finished build is reused.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

#: The adapters' recipe: every linear module of the Llama blocks.
RANK, ALPHA = 8, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR_SCALE = 10.0


def lora_dir(world: str | Path, skill: str) -> Path:
    """Where the LoRA expert of ``skill`` lives in a mini world."""
    return Path(world) / f"lora_{skill}"


def build_lora_experts(world: str | Path, *, seed: int = 0, size: str = "default", progress: bool = True,
                       force: bool = False) -> Path:
    """Train (or reuse) the LoRA experts of the mini world in ``world`` (built first if absent); returns ``world``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cycleqd.mini.build import SIZES, _seeded, build_mini_world, expert_data, recipe_hash
    from cycleqd.mini.skills import SKILLS
    from cycleqd.mini.train import train

    world = build_mini_world(world, seed=seed, size=size, progress=progress)
    recipe = SIZES[size]
    stamp = {"seed": seed, "size": size, "recipe": recipe_hash(recipe), "rank": RANK, "alpha": ALPHA,
             "targets": list(TARGETS), "lr_scale": LR_SCALE, "skills": list(SKILLS)}
    done = world / "lora_manifest.json"
    if not force and done.is_file() and {k: v for k, v in json.loads(done.read_text()).items() if k in stamp} == stamp:
        return world
    done.unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(world / "base")
    seconds = {}
    for k, skill in enumerate(SKILLS):
        t0 = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained(world / "base", dtype=torch.float32)
        torch.manual_seed(seed + 101 + k)
        peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
        spec = _seeded(recipe.expert, seed + 1 + k)
        spec = replace(spec, lr=spec.lr * LR_SCALE)
        train(peft_model, tok, expert_data(skill, recipe, seed), spec, desc=f"lora_{skill}", progress=progress)
        peft_model.save_pretrained(str(lora_dir(world, skill)))
        # the adapter names its base by the folder it was trained from
        cfg_file = lora_dir(world, skill) / "adapter_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = str((world / "base").resolve())
        cfg_file.write_text(json.dumps(cfg, indent=2))
        seconds[skill] = round(time.perf_counter() - t0, 2)
    done.write_text(json.dumps({**stamp, "train_seconds": seconds}, indent=2))
    return world
