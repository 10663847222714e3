"""The fourth mini skill, regex: real checker in the sandbox, and its expert trained from the base on first use."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from run_helpers import ScriptedEngine

from cycleqd.config import SandboxConfig
from cycleqd.mini.build import build_mini_world
from cycleqd.mini.items import split_of
from cycleqd.mini.skills import SKILLS, skill_items
from cycleqd.registry import TASKS

ALLOW = SandboxConfig(allow_code_execution=True)


def _task(n=40, split="test"):
    return TASKS.get("mini_regex")(name="regex", sandbox=ALLOW, split=split, n=n, seed=0)


def test_regex_is_an_extra_skill_with_disjoint_splits():
    assert "regex" not in SKILLS  # the default world (and its base mixture) keeps its three skills
    items = {s: skill_items("regex", s, 100, seed=0) for s in ("train", "val", "test")}
    assert all(split_of(it.prompt) == s for s, its in items.items() for it in its)
    assert len({it.family for it in items["val"]}) >= 10
    assert all(it.prompt.startswith("re: ") and "\n" not in it.answer for its in items.values() for it in its)


def test_gold_patterns_solve_and_wrong_ones_fail_in_the_sandbox():
    task = _task()
    assert task.evaluate(ScriptedEngine(task, lambda it: it.answer)).quality == 1.0
    # matches nothing: every item has a test string its gold pattern accepts
    assert task.evaluate(ScriptedEngine(task, lambda it: "^$")).quality == 0.0
    broken = task.evaluate(ScriptedEngine(task, lambda it: "(["))
    assert broken.quality == 0.0 and all(s.error for s in broken.samples)
    # near misses: the anchors dropped; the test strings tell them apart
    loose = task.evaluate(ScriptedEngine(task, lambda it: it.answer.strip("^$")))
    anchored = [it for it in task.items if it.answer.startswith("^") or it.answer.endswith("$")]
    assert anchored and loose.quality <= 1 - len(anchored) / len(task.items) + 0.1


def test_needs_the_code_execution_opt_in():
    from cycleqd.sandbox import CodeExecutionNotAllowed

    task = TASKS.get("mini_regex")(name="regex", sandbox=SandboxConfig(), split="val", n=5, seed=0)
    with pytest.raises(CodeExecutionNotAllowed):
        task.evaluate(ScriptedEngine(task, lambda it: it.answer))


def _sha(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_extra_expert_is_trained_from_the_base_cached_and_leaves_the_world_alone(tmp_path):
    from cycleqd.mini.expert import ensure_extra_expert

    world = build_mini_world(tmp_path / "mini", seed=0, size="tiny", progress=False)
    before = {p.relative_to(world): p.read_bytes() for p in world.rglob("*") if p.is_file()}
    out = ensure_extra_expert(world, "regex", size="tiny", progress=False)
    assert out == world / "expert_regex" and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert {p.relative_to(world): p.read_bytes() for p in world.rglob("*")
            if p.is_file() and not p.relative_to(world).parts[0] == "expert_regex"} == before
    first, stamp = _sha(out), (out / "model.safetensors").stat().st_mtime_ns
    assert _sha(out) != _sha(world / "base")
    assert ensure_extra_expert(world, "regex", size="tiny", progress=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    shutil.rmtree(out)
    assert _sha(ensure_extra_expert(world, "regex", size="tiny", progress=False)) == first  # deterministic
    with pytest.raises(ValueError, match="not an extra mini skill"):
        ensure_extra_expert(world, "code", size="tiny", progress=False)
