"""The paper's experiment file is a valid config (its models are not fetched here)."""
from __future__ import annotations

from pathlib import Path

import yaml

from cycleqd.config import parse_config

PAPER = Path(__file__).resolve().parents[2] / "experiments" / "paper_llama3_8b.yaml"


def test_paper_config_parses_with_the_official_settings() -> None:
    cfg = parse_config(yaml.safe_load(PAPER.read_text()), str(PAPER))
    assert cfg.models.base == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert cfg.expert_paths() == ["SakanaAI/Llama-3-8B-Instruct-Coding-Expert", "SakanaAI/Llama-3-8B-Instruct-DB-Expert",
                                  "SakanaAI/Llama-3-8B-Instruct-OS-Expert"]
    bins = {t.name: (t.bins.lo, t.bins.hi, t.bins.count) for t in cfg.tasks}
    assert bins == {"mbpp": (0.0, 0.75, 15), "dbbench": (0.0, 0.45, 15), "os_interaction": (0.0, 0.45, 15)}
    assert [t.kind for t in cfg.tasks] == ["mbpp", "dbbench", "os_interaction"]
    assert cfg.tasks[0].data == "data/MbppPlus-v0.1.0.jsonl"
    assert (cfg.tasks[1].data, cfg.tasks[2].data) == ("AgentBench/data/dbbench", "AgentBench/data/os_interaction")
    assert cfg.tasks[1].options["backend"] == "mysql" and cfg.tasks[2].options["runs"] == 5
    assert all(t.options["protocol"] == "official" for t in cfg.tasks)
    assert cfg.tasks[1].options["select"] == cfg.tasks[2].options["select"] == "official"
    # every task's options are valid options of that task
    from cycleqd.registry import TASKS

    for t in cfg.tasks:
        TASKS.get(t.kind).Options(**t.options)
    assert cfg.evolution.generations == 1200
    assert (cfg.evolution.mutation.name, cfg.evolution.mutation.rate) == ("svd", 0.1)
    assert (cfg.evolution.sampling.name, cfg.evolution.sampling.mapping) == ("elite", "official")
    assert (cfg.engine.dtype, cfg.engine.device) == ("bfloat16", "cuda")
    assert cfg.sandbox.allow_code_execution is True
