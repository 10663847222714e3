"""A private stream of numpy's global random state, for optimizers that draw from ``np.random``
(the ``cma`` package does): inside ``with stream:`` the global state is this stream's, and
outside it is what it was, so an optimizer replays exactly whatever else draws meanwhile."""
from __future__ import annotations

import numpy as np


class GlobalNumpyStream:
    """``with GlobalNumpyStream(seed):`` runs its body on its own ``np.random`` state."""

    def __init__(self, seed: int):
        self._state = np.random.RandomState(seed).get_state()
        self._outer = None

    def __enter__(self) -> "GlobalNumpyStream":
        self._outer = np.random.get_state()
        np.random.set_state(self._state)
        return self

    def __exit__(self, *exc) -> None:
        self._state = np.random.get_state()
        np.random.set_state(self._outer)
