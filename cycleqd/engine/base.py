"""What every engine does: generate text for a batch of requests, take new weights in place."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import torch


@dataclass(frozen=True)
class GenRequest:
    """One generation request.

    Exactly one of ``prompt`` (a raw string, already templated) or ``messages``
    (chat messages ``[{"role": ..., "content": ...}]``, templated by the engine with
    the tokenizer's chat template) is set. ``sample_id`` and ``turn`` (0-based round
    of a multi-turn episode) let the replay engine return recorded outputs.
    ``prefill`` (chat messages only) is text the assistant turn starts with; the
    completion is what the model writes after it.
    """

    sample_id: str
    turn: int = 0
    prompt: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    max_new_tokens: int = 512
    stop: tuple[str, ...] = field(default_factory=tuple)
    prefill: str = ""


class Engine(Protocol):
    """A text generator whose weights can be replaced in place."""

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        """Greedy completions, one per request, cut at the first stop string."""
        ...

    def load_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` into the resident model without re-instantiating it."""
        ...
