"""Run store: atomic writes, a torn log tail is dropped, resolved config round-trips."""
import json
import os

import pytest

from cycleqd.config import ConfigError, parse_config
from cycleqd.search.child import ChildRecord
from cycleqd.runs.store import RunNotFound, RunStore, write_atomic


@pytest.fixture
def cfg(tiny_family, tmp_path):
    return parse_config({
        "models": {"base": str(tiny_family["base"]), "experts": {t: str(tiny_family[t]) for t in "ab"}},
        "tasks": [{"name": t, "kind": "likelihood", "data": str(tmp_path / "x.txt")} for t in "ab"],
    })


def test_write_atomic_replaces_whole_files_with_normal_permissions(tmp_path):
    f = tmp_path / "a.json"
    write_atomic(f, "one")
    write_atomic(f, b"two")
    assert f.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp files left
    assert f.stat().st_mode & 0o044  # readable by others, like a normal file


def _rec(generation: int, cid: str) -> ChildRecord:
    return ChildRecord(generation=generation, id=cid, quality_task="a", parents=("seed_a", "seed_b"),
                       scores={"a": 0.5, "b": 0.5}, seed=generation)


def test_torn_last_line_is_ignored_and_repaired(cfg, tmp_path):
    store = RunStore.create(tmp_path / "run", cfg)
    store.append_child(_rec(1, "g000001"))
    with open(store.path / RunStore.CHILDREN, "a") as f:
        f.write('{"generation": 2, "id": "g2", "sco')  # a writer killed mid-line
    assert [c.id for c in store.children()] == ["g000001"]
    store.append_child(_rec(2, "g000003"))
    assert [c.id for c in store.children()] == ["g000001", "g000003"]
    assert [c.index for c in store.children()] == [0, 2]  # the ask order, from the id
    lines = (store.path / RunStore.CHILDREN).read_text().splitlines()
    assert all(json.loads(line) for line in lines)


def test_create_refuses_an_existing_run_and_open_refuses_a_non_run(cfg, tmp_path):
    RunStore.create(tmp_path / "run", cfg)
    with pytest.raises(ConfigError, match="resume"):
        RunStore.create(tmp_path / "run", cfg)
    with pytest.raises(RunNotFound):
        RunStore(tmp_path / "elsewhere")


def test_resolved_config_round_trips(cfg, tmp_path):
    store = RunStore.create(tmp_path / "run", cfg)
    again = store.config()
    assert again == cfg
    assert os.path.isabs(again.models.base)


def test_a_run_refuses_to_go_on_over_changed_models(tiny_family, tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from cycleqd.runs.store import check_models

    family = {k: shutil.copytree(tiny_family[k], tmp_path / k) for k in ("base", "a", "b")}
    cfg = parse_config({
        "models": {"base": str(family["base"]), "experts": {t: str(family[t]) for t in "ab"}},
        "tasks": [{"name": t, "kind": "likelihood", "data": str(tmp_path / "x.txt")} for t in "ab"],
    })
    store = RunStore.create(tmp_path / "run", cfg)
    check_models(store, cfg)  # first drive: records the fingerprints
    recorded = store.models()
    assert set(recorded) == {"base", "expert_a", "expert_b"} and len(set(recorded.values())) == 3
    check_models(store, cfg)  # same weights: goes on

    # the same expert retrained: same shapes and file size, other values
    model = AutoModelForCausalLM.from_pretrained(family["b"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(family["b"])
    with pytest.raises(ConfigError, match="expert_b changed"):
        check_models(store, cfg)
    assert store.models() == recorded  # the record is not overwritten
