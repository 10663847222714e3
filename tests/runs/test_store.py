"""Run store: atomic writes, a torn log tail is dropped, resolved config round-trips."""
import json
import os

import pytest

from cycleqd.atomic import write_atomic
from cycleqd.config import ConfigError, parse_config
from cycleqd.runs.store import RunNotFound, RunStore
from cycleqd.search.archive import Archive
from cycleqd.search.child import ChildRecord, SeedRecord


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


def _archive(cfg) -> Archive:
    return Archive(cfg.task_names, {t.name: t.bins for t in cfg.tasks})


def test_torn_last_line_is_ignored_and_repaired(cfg, tmp_path):
    store = RunStore.create(tmp_path / "run", cfg)
    store.commit(_rec(1, "g000001"), b"genome 1", None, _archive(cfg))
    with open(store.path / RunStore.CHILDREN, "a") as f:
        f.write('{"generation": 2, "id": "g2", "sco')  # a writer killed mid-line
    assert [c.id for c in store.children()] == ["g000001"]
    store.commit(_rec(2, "g000003"), b"genome 3", None, _archive(cfg))
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


def test_one_commit_writes_the_genome_then_the_log_line_then_the_derived_files(cfg, tmp_path):
    """The store owns the write-ahead order: a line is never on disk before the genome it names,
    seeds and children go through the same call, and the stats line waits for every seed."""
    store = RunStore.create(tmp_path / "run", cfg)
    archive = _archive(cfg)
    seen: list[str] = []
    real_write, real_append = write_atomic, store._append

    def spy_write(path, data):
        seen.append(os.path.basename(path))
        real_write(path, data)

    import cycleqd.runs.store as store_module
    store_module.write_atomic = spy_write
    store._append = lambda name, rec, **kw: (seen.append(name), real_append(name, rec, **kw))
    try:
        for t in cfg.task_names:
            archive.offer(f"seed_{t}", {"a": 0.2, "b": 0.3}, 0)
            store.commit(SeedRecord(task=t, genome=f"seed_{t}", scores={"a": 0.2, "b": 0.3}), b"seed",
                         [{"id": "1"}], archive)
        archive.offer("g000001", {"a": 0.5, "b": 0.5}, 1)
        store.commit(_rec(1, "g000001"), b"child", None, archive)
    finally:
        store_module.write_atomic = real_write
    assert seen == ["seed_a.safetensors", "seed_a.jsonl", "seeds.json", "archives.json",
                    "seed_b.safetensors", "seed_b.jsonl", "seeds.json", "archives.json", "stats.jsonl",
                    "g000001.safetensors", "children.jsonl", "archives.json", "stats.jsonl"]
    assert list(store.seeds()) == ["a", "b"] and store.episodes("seed_a") == [{"id": "1"}]
    assert store.genome_path("g000001").read_bytes() == b"child"
    assert [s["generation"] for s in store.stats()] == [0, 1]


def test_a_failed_child_is_logged_without_a_genome(cfg, tmp_path):
    store = RunStore.create(tmp_path / "run", cfg)
    failed = ChildRecord(generation=1, id="g000001", quality_task="a", parents=("seed_a", "seed_b"), seed=1,
                         error="RuntimeError: out of memory")
    store.commit(failed, None, None, _archive(cfg))
    assert not store.genome_path("g000001").exists()
    assert [c.error for c in store.children()] == ["RuntimeError: out of memory"]


def test_store_with_syncer_writes_what_the_inline_store_writes(cfg, tmp_path):
    """The same commits with fsync inline and in the background leave byte-identical logs and genomes;
    a torn tail left by another writer is still dropped while the syncer runs."""
    folders = []
    for mode in ("child", "batch"):
        store = RunStore.create(tmp_path / mode, cfg)
        if mode == "batch":
            store.start_syncer()
        store.commit(_rec(1, "g000001"), b"genome 1", None, _archive(cfg))
        with open(store.path / RunStore.CHILDREN, "a") as f:
            f.write('{"generation": 2, "id": "g2", "sco')  # a writer killed mid-line
        store.commit(_rec(2, "g000003"), b"genome 3", None, _archive(cfg))
        if mode == "batch":
            assert store.syncer is not None
            store.stop_syncer()
            assert store.syncer is None
        assert [c.id for c in store.children()] == ["g000001", "g000003"]
        folders.append(store.path)
    a, b = folders
    assert (a / RunStore.CHILDREN).read_bytes() == (b / RunStore.CHILDREN).read_bytes()
    assert (a / "genomes").iterdir() and all(
        (b / "genomes" / p.name).read_bytes() == p.read_bytes() for p in (a / "genomes").iterdir())
    assert sorted(p.name for p in (a / "genomes").iterdir()) == sorted(p.name for p in (b / "genomes").iterdir())
