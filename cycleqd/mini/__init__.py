"""The embedded mini world: three generated skills, a char-level tokenizer, a tiny Llama base and experts.

Public entry points (import torch lazily):

    from cycleqd.mini import build_mini_world, ensure_mini_world
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def build_mini_world(dir: str | Path, seed: int = 0, size: str = "default", force: bool = False,
                     progress: bool = True) -> Path:
    """See :func:`cycleqd.mini.build.build_mini_world`."""
    from cycleqd.mini.build import build_mini_world as _build

    return _build(dir, seed=seed, size=size, force=force, progress=progress)


def ensure_mini_world(cfg: Any, *, progress: bool = True) -> Path | None:
    """See :func:`cycleqd.mini.build.ensure_mini_world`."""
    from cycleqd.mini.build import ensure_mini_world as _ensure

    return _ensure(cfg, progress=progress)


__all__ = ["build_mini_world", "ensure_mini_world"]
