"""Disjoint splits for dataset tasks (mbpp, dbbench, os_interaction): they take one selection of ids
and no split, so every held-out scoring path (the table's test draw, `team --split`,
`trajectories --split`, all through ``split_config``) refuses them instead of scoring the items
evolution scored."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cycleqd.config import ConfigError, parse_config, split_config

REPO = Path(__file__).parents[2]


@pytest.mark.parametrize("kind", ["mbpp", "dbbench", "os_interaction"])
def test_a_dataset_task_cannot_be_given_a_held_out_split(kind):
    """A dataset task names its items only by ``ids`` / ``limit`` / ``select``: asking it for the
    test split is one ConfigError naming the option, so the final scoring cannot silently reuse
    the evolution items."""
    data = yaml.safe_load((REPO / "experiments" / "mini.yaml").read_text())
    data["tasks"][0] = {"name": "code", "kind": kind, "data": "rows.jsonl", "bins": {"lo": 0, "hi": 1, "count": 4},
                        "options": {"ids": ["1", "2"]}}
    cfg = parse_config(data)
    with pytest.raises(ConfigError) as e:
        split_config(cfg, "test", 5)
    msg = str(e.value)
    assert "\n" not in msg and f"task code ({kind}): unknown option 'split'" in msg
    for extra in ({"evolution_split": "test"}, {"final_ids": ["1"]}, {"splits": {"final": "test"}}):
        bad = yaml.safe_load(yaml.safe_dump(data))
        bad["tasks"][0]["options"].update(extra)
        with pytest.raises(ConfigError, match="unknown option"):
            parse_config(bad)
