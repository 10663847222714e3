"""The sample sets the official CycleQD code scores, shipped as data files.

``dbbench_samples.json`` lists AgentBench DBBench rows as ``{"split", "index"}``
(``standard.jsonl`` then ``dev.jsonl``); ``os_interaction_samples.json`` lists AgentBench
OS problems as ``{"file", "index"}`` with ``file`` relative to AgentBench's
``data/os_interaction/data/``. Both are ids into AgentBench's own files, which the user
supplies (a checkout of THUDM/AgentBench).
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any


@lru_cache(maxsize=None)
def official_samples(task: str) -> dict[str, Any]:
    """The shipped official sample list of ``task`` (``dbbench`` or ``os_interaction``).

    Raises:
        KeyError: no list is shipped for ``task``.
    """
    if task not in ("dbbench", "os_interaction"):
        raise KeyError(f"no official sample list for task {task!r}")
    text = resources.files(__package__).joinpath(f"{task}_samples.json").read_text(encoding="utf-8")
    return json.loads(text)
