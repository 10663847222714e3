"""Mini generators: deterministic, disjoint splits, well-formed items."""
from __future__ import annotations

import pytest

from cycleqd.mini.items import split_of
from cycleqd.mini.skills import SKILLS, skill_items


@pytest.mark.parametrize("skill", list(SKILLS))
def test_deterministic_in_seed(skill):
    a = skill_items(skill, "val", 50, seed=3)
    b = skill_items(skill, "val", 50, seed=3)
    c = skill_items(skill, "val", 50, seed=4)
    assert [(i.prompt, i.answer, dict(i.context)) for i in a] == [(i.prompt, i.answer, dict(i.context)) for i in b]
    assert [i.prompt for i in a] != [i.prompt for i in c]


@pytest.mark.parametrize("skill", list(SKILLS))
def test_splits_disjoint_and_large_enough(skill):
    prompts = {split: {i.prompt for i in skill_items(skill, split, 300, seed=0)} for split in ("train", "val", "test")}
    assert all(len(p) == 300 for p in prompts.values())  # >= 300 distinct items per split
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    # Other seeds draw other items but never cross splits.
    other = {i.prompt for i in skill_items(skill, "test", 300, seed=9)}
    assert not other & prompts["train"] and not other & prompts["val"]
    assert all(split_of(p) == "test" for p in other)


@pytest.mark.parametrize("skill", list(SKILLS))
def test_items_are_one_line_answers_with_ids(skill):
    items = skill_items(skill, "test", 100, seed=0)
    assert [i.id for i in items] == [str(k) for k in range(100)]
    prefix = SKILLS[skill].PREFIX
    for it in items:
        assert it.prompt.startswith(prefix + ": ") and it.prompt.endswith("\n") and it.prompt.count("\n") == 1
        assert it.answer and "\n" not in it.answer
    assert len({i.family for i in items}) >= 10  # every kind of request shows up


def test_unknown_split():
    with pytest.raises(ValueError, match="split"):
        skill_items("code", "dev", 5)
