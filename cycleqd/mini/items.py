"""Procedurally generated items of the mini tasks, and the rule that splits them.

An item is a one-line natural-language spec (the prompt) with one gold answer
line and the context the checker needs (test inputs, a table, files). Splits are
decided by a hash of the prompt text, so the same spec can never appear in two
splits, whatever seed or size is asked for.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

SPLITS = ("train", "val", "test")

#: A family draws one (spec, answer, context) from a random generator.
Family = Callable[[random.Random], tuple[str, str, dict[str, Any]]]


@dataclass(frozen=True)
class MiniItem:
    """One mini-task item.

    ``prompt`` ends with a newline and the model is asked to continue it with
    ``answer`` (one line, no newline). ``context`` is what the checker needs.
    """

    id: str
    family: str
    prompt: str
    answer: str
    context: Mapping[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """Prompt and answer as one training line."""
        return self.prompt + self.answer + "\n"


def split_of(prompt: str) -> str:
    """The split a prompt belongs to: 20% test, 20% val, 60% train, by hash."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") % 10
    return "test" if h < 2 else "val" if h < 4 else "train"


def sample_items(
    prefix: str,
    families: Mapping[str, Family],
    *,
    split: str,
    n: int,
    seed: int,
    only: Sequence[str] | None = None,
    weights: Mapping[str, float] | None = None,
    distinct: bool = True,
) -> list[MiniItem]:
    """Draw ``n`` distinct items of ``split`` (ids "0".."n-1"), deterministic in ``seed``.

    Args:
        prefix: task tag starting every prompt ("py", "sql", "sh").
        families: name -> generator of (spec, answer, context).
        only: restrict to these families (default all).
        weights: relative frequency per family (default uniform).
        distinct: no repeated prompt (evaluation); training streams allow repeats.

    Raises:
        ValueError: unknown split, or the families cannot give ``n`` distinct items.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    names = list(only) if only is not None else list(families)
    w = [float((weights or {}).get(f, 1.0)) for f in names]
    # Seeds are offset per split so val/test draws differ from train draws.
    rng = random.Random(f"{prefix}:{split}:{seed}")
    seen: set[str] = set()
    items: list[MiniItem] = []
    tries = 0
    while len(items) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"{prefix}: only {len(items)} distinct {split} items, asked for {n}")
        fam = rng.choices(names, weights=w)[0]
        spec, answer, context = families[fam](rng)
        prompt = f"{prefix}: {spec}\n"
        if (distinct and prompt in seen) or split_of(prompt) != split:
            continue
        seen.add(prompt)
        items.append(MiniItem(str(len(items)), fam, prompt, answer, context))
    return items
