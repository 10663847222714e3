"""The tiny mini world: really trained, saved as plain Hugging Face folders, cached."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cycleqd.config import parse_config
from cycleqd.mini import build_mini_world, ensure_mini_world
from cycleqd.mini.build import MODEL_NAMES, is_built
from cycleqd.mini.tokenizer import make_char_tokenizer


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    return build_mini_world(tmp_path_factory.mktemp("mini"), seed=0, size="tiny", progress=False)


def test_tokenizer_round_trip(tmp_path):
    make_char_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "py: add 3 to n\ndef f(n): return n+3\t'x' \"y\" ~"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert {tok.pad_token, tok.eos_token, tok.bos_token} == {"<pad>", "</s>", "<s>"}
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<assistant>") and "hi" in chat


def test_tiny_world_loads_as_hf_models(tiny_world):
    manifest = json.loads((tiny_world / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["size"] == "tiny"
    assert set(manifest["scores"]["test"]) == set(MODEL_NAMES)
    base = AutoModelForCausalLM.from_pretrained(tiny_world / "base")
    tok = AutoTokenizer.from_pretrained(tiny_world / "base")
    assert base.config.model_type == "llama" and base.config.vocab_size == len(tok)
    for name in MODEL_NAMES[1:]:
        expert = AutoModelForCausalLM.from_pretrained(tiny_world / name)
        diffs = [(pe - pb).abs().max().item() for pe, pb in zip(expert.parameters(), base.parameters())]
        assert max(diffs) > 0  # fine-tuned, not a copy
        ids = tok(["sql: how many pets\n"], return_tensors="pt")["input_ids"]
        assert torch.isfinite(expert(ids).logits).all()


def test_cached_build_is_skipped_and_deterministic(tiny_world, tmp_path):
    before = (tiny_world / "manifest.json").stat().st_mtime_ns
    assert build_mini_world(tiny_world, seed=0, size="tiny", progress=False) == tiny_world
    assert (tiny_world / "manifest.json").stat().st_mtime_ns == before
    assert is_built(tiny_world, 0, "tiny") and not is_built(tiny_world, 1, "tiny")
    assert not is_built(tiny_world, 0, "default")


def test_ensure_mini_world_from_config(tiny_world):
    cfg = parse_config(
        {
            "models": {
                "base": str(tiny_world / "base"),
                "experts": {t: str(tiny_world / f"expert_{t}") for t in ("code", "sql")},
                "mini": {"dir": str(tiny_world), "seed": 0, "size": "tiny"},
            },
            "tasks": [{"name": "code", "kind": "mini_code"}, {"name": "sql", "kind": "mini_sql"}],
        }
    )
    assert ensure_mini_world(cfg, progress=False) == tiny_world
    no_mini = cfg.model_copy(update={"models": cfg.models.model_copy(update={"mini": None})})
    assert ensure_mini_world(no_mini) is None


def test_unknown_size(tmp_path):
    with pytest.raises(ValueError, match="size"):
        build_mini_world(tmp_path, size="huge")


def test_training_is_deterministic_in_seed():
    from cycleqd.mini.build import SIZES, base_mixture
    from cycleqd.mini.train import TrainSpec, new_model, train

    recipe = SIZES["tiny"]
    tok = make_char_tokenizer()
    items = base_mixture(recipe, seed=0)
    spec = TrainSpec(steps=3, lr=1e-3, batch_size=4)
    runs = []
    for _ in range(2):
        model = new_model(tok, recipe.shape, seed=0)
        runs.append((train(model, tok, items, spec, progress=False), model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    assert base_mixture(recipe, seed=0) == items and base_mixture(recipe, seed=1) != items


def test_base_mixture_favours_the_common_families_and_refuses_unknown_ones():
    from collections import Counter
    from dataclasses import replace

    from cycleqd.mini.build import SIZES, base_mixture

    recipe = SIZES["default"]
    fams = Counter((it.prompt.split(":")[0], it.family) for it in base_mixture(recipe, seed=0))
    for prefix, skill in (("py", "code"), ("sql", "sql"), ("sh", "shell")):
        common = set(recipe.base_families[skill])
        mine = {f: c for (p, f), c in fams.items() if p == prefix}
        assert min(mine[f] for f in common) > 2 * max(c for f, c in mine.items() if f not in common)
    bad = replace(recipe, base_families={**recipe.base_families, "sql": ("gt", "lookup")})
    with pytest.raises(ValueError, match="lookup"):
        base_mixture(bad, seed=0)


def test_every_rare_family_is_taught_by_exactly_one_expert_and_half_by_its_own():
    from collections import Counter
    from dataclasses import replace

    from cycleqd.mini.build import WorldRecipe, expert_data, expert_families
    from cycleqd.mini.skills import SKILLS

    recipe = WorldRecipe()
    mix = expert_families(recipe)
    for skill, mod in SKILLS.items():
        common = set(recipe.base_families[skill])
        rare = [f for f in mod.FAMILIES if f not in common]
        owners = Counter(f for e in mix for f in mix[e].get(skill, ()) if f in rare)
        assert owners == Counter(rare)  # each rare family once, none lost
        own_rare = [f for f in mix[skill][skill] if f in rare]
        assert len(own_rare) == (len(rare) + 1) // 2
        assert common <= set(mix[skill][skill])  # common families stay with their own expert
        for other in SKILLS:
            if other != skill:
                assert not set(mix[other].get(skill, ())) & common
    # the training stream holds what the mix says, in proportion to its families
    items = expert_data("code", replace(recipe, expert=replace(recipe.expert, steps=40)), 0)
    share = Counter(it.prompt.split(":")[0] for it in items)
    n_code = len(mix["code"]["code"])
    total = sum(len(v) for v in mix["code"].values())
    assert abs(share["py"] / len(items) - n_code / total) < 0.02
    assert expert_families(replace(recipe, expert_mix="own"))["sql"] == {"sql": tuple(SKILLS["sql"].FAMILIES)}
    with pytest.raises(ValueError, match="expert_mix"):
        expert_families(replace(recipe, expert_mix="mixed"))


def test_small_world_experts_solve_their_own_skill(small_world):
    """The small world (the team, trajectory and worker tests' models): each expert clearly solves its
    own skill, well above the base and every other expert there."""
    manifest = json.loads((small_world / "manifest.json").read_text())
    assert manifest["size"] == "small" and is_built(small_world, 0, "small")
    val = manifest["scores"]["val"]
    for skill in ("code", "sql", "shell"):
        own = val[f"expert_{skill}"][skill]
        assert own >= 0.6 and own >= val["base"][skill] + 0.3
        assert all(own > val[f"expert_{o}"][skill] for o in ("code", "sql", "shell") if o != skill)
