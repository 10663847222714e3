"""A worker evaluating several children at once as LoRA adapters (evolution.children_per_worker):
each child's scores and genome equal those of the child materialised densely and evaluated alone."""
from __future__ import annotations

from pathlib import Path

import pytest

from cycleqd.config import ConfigError, parse_config
from cycleqd.evolve.worker import ChildWorker
from cycleqd.model.genome import Genome
from cycleqd.search.child import ChildSpec
from tiny_models import make_lora_experts

SKILLS = ("sql", "code", "shell")
SPECS = {
    "sql": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "code": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], "use_rslora": True},
    "shell": {"r": 3, "lora_alpha": 3, "target_modules": ["o_proj", "up_proj"]},
}


def _cfg(small_world: Path, experts: dict, cache: Path, per: int) -> dict:
    return {"name": "w", "seed": 0, "sandbox": {"allow_code_execution": True},
            "tasks": [{"name": k, "kind": f"mini_{k}", "options": {"split": "val", "n": 12}} for k in SKILLS],
            "models": {"base": str(small_world / "base"), "experts": {k: str(p) for k, p in experts.items()}},
            "evolution": {"generations": 1, "workers": 1, "children_per_worker": per,
                          "crossover": {"sigma": 0.3}, "mutation": {"rate": 0.3}},
            "engine": {"device": "cpu", "batch_size": 64}, "prepare_cache": str(cache)}


@pytest.fixture(scope="module")
def lora_experts(tmp_path_factory, small_world: Path) -> dict:
    made = make_lora_experts(small_world / "base", tmp_path_factory.mktemp("lora"), SPECS, seed=2, merged=False,
                             magnitude=0.3)
    return {k: p["adapter"] for k, p in made.items()}


def test_children_as_adapters_score_as_each_alone(tmp_path, small_world, lora_experts):
    """Three children evaluated at once (shared batches) get the scores and genomes of each alone (dense swaps)."""
    together = ChildWorker(parse_config(_cfg(small_world, lora_experts, tmp_path, 3)), threads=1)
    alone = ChildWorker(parse_config(_cfg(small_world, lora_experts, tmp_path, 1)), threads=1)
    seeds = [Genome.seed(k, together.factors).to_bytes() for k in range(3)]
    items = [(ChildSpec(i, f"c{i}", SKILLS[i], (f"s{i}", f"s{(i + 1) % 3}"), 100 + i), [seeds[i], seeds[(i + 1) % 3]])
             for i in range(3)]
    got = together.run_many(items)
    want = [alone.run(*it) for it in items]
    assert [r.error for r in got] == [None] * 3, [r.error for r in got]
    assert [r.scores for r in got] == [r.scores for r in want]
    assert [r.genome for r in got] == [r.genome for r in want]
    assert together.gather.widest >= 2  # generation calls of several children really shared batches
    assert len({tuple(r.scores.values()) for r in want} | {tuple(alone.evaluate(Genome.base(alone.factors))[0].values())}) > 1


def test_several_children_need_lora_experts(tmp_path, small_world):
    """children_per_worker > 1 over dense experts is refused with one line before any model loads."""
    dense = {k: small_world / f"expert_{k}" for k in SKILLS}
    with pytest.raises(ConfigError, match="needs LoRA experts"):
        ChildWorker(parse_config(_cfg(small_world, dense, tmp_path, 2)), threads=1)
