"""A dict that keeps only its most recently written entries."""
from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(dict[K, V]):
    """A dict of at most ``size`` entries: writing a key makes it the newest; past ``size`` the oldest goes.

    Used for what evaluation remembers between models of a run (drafts, encoded prompts,
    check runs): related models ask the same things, and memory must stay bounded.
    ``size`` 0 keeps nothing.
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = max(0, int(size))

    def __setitem__(self, key: K, value: V) -> None:
        self.pop(key, None)
        super().__setitem__(key, value)
        while len(self) > self.size:
            del self[next(iter(self))]
