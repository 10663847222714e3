"""Replay engine: recorded model outputs instead of a model (``cycleqd score --answers``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from cycleqd.config import ConfigError
from cycleqd.engine.protocol import Engine, GenRequest
from cycleqd.registry import register_engine


class ReplayError(ConfigError):
    """The answers file is missing or malformed (a bad-input error)."""


@register_engine("replay")
class ReplayEngine(Engine):
    """Returns ``turns[request.turn]`` recorded for ``request.sample_id``.

    The file is JSONL, one ``{"id": sample id, "turns": [text of turn 1, ...]}`` per
    line; ids may be ints or strings and are compared as strings. A sample or turn
    that was not recorded generates ``""`` (which a task scores as a wrong answer).

    Raises:
        ReplayError: the file is missing, a line is not JSON, or a record lacks
            ``id`` / a list of string ``turns``.
    """

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ReplayError(f"answers file {str(path)!r} not found")
        self.answers: dict[str, list[str]] = {}
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReplayError(f"{self.path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("turns"), list):
                raise ReplayError(f"{self.path}:{n}: expected {{\"id\": ..., \"turns\": [...]}}")
            if not all(isinstance(t, str) for t in rec["turns"]):
                raise ReplayError(f"{self.path}:{n}: every turn must be a string")
            self.answers[str(rec["id"])] = list(rec["turns"])

    @classmethod
    def from_path(cls, path: str | Path, engine_cfg: object = None) -> "ReplayEngine":
        """Same as ``ReplayEngine(path)``; mirrors the other engines' constructor."""
        return cls(path)

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        """The recorded text for each request, or ``""`` where none was recorded."""
        out = []
        for r in requests:
            turns = self.answers.get(str(r.sample_id), [])
            out.append(turns[r.turn] if 0 <= r.turn < len(turns) else "")
        return out

    def load_weights(self, weights: object) -> None:
        """Always raises TypeError: a replay has no weights."""
        raise TypeError("replay engine has no weights to load")
