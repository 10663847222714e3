"""The mini skills by name (the default world's three and the extra ones), and their item lists."""
from __future__ import annotations

from types import ModuleType
from typing import Mapping, Sequence

from cycleqd.mini.generators import code, regex, shell, sql
from cycleqd.mini.items import MiniItem, sample_items

#: skill name -> generator module (with PREFIX and FAMILIES).
SKILLS: dict[str, ModuleType] = {"code": code, "sql": sql, "shell": shell}
#: Skills outside the default world (its base never trains on them): each grows a run.
EXTRA_SKILLS: dict[str, ModuleType] = {"regex": regex}


def skill_items(
    skill: str,
    split: str,
    n: int,
    seed: int = 0,
    *,
    only: Sequence[str] | None = None,
    weights: Mapping[str, float] | None = None,
    distinct: bool = True,
) -> list[MiniItem]:
    """``n`` items of ``skill`` ("code", "sql", "shell") from ``split``; see :func:`sample_items`."""
    mod = SKILLS.get(skill) or EXTRA_SKILLS[skill]
    return sample_items(
        mod.PREFIX, mod.FAMILIES, split=split, n=n, seed=seed, only=only, weights=weights, distinct=distinct
    )
