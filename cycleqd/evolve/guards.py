"""Guards against the fitness traps of evolutionary merging that a run can see as it goes.

Truncation: a generative fitness with a short ``max_new_tokens`` rewards children that answer
briefly, so a run whose answers often stop at the token limit measures the limit, not the
skill. Every child records, per task, the share of its answers that stopped there
(``truncated`` in children.jsonl); :class:`TruncationGuard` warns once a run when a share
passes ``evolution.truncation_warning`` (default 0.1).
"""
from __future__ import annotations

import logging
from typing import Mapping

log = logging.getLogger("cycleqd")


class TruncationGuard:
    """Warns once when a child's share of answers cut at ``max_new_tokens`` on any task passes ``threshold``.

    Args:
        threshold: the share in [0, 1] above which it warns.
    """

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.warned: str | None = None  # the warning given, if any

    def see(self, genome: str, truncated: Mapping[str, float]) -> str | None:
        """Look at one child's shares; returns the warning when this call gave it."""
        if self.warned is not None:
            return None
        over = {t: s for t, s in truncated.items() if s > self.threshold}
        if not over:
            return None
        task, share = max(over.items(), key=lambda kv: kv[1])
        self.warned = (f"{genome}: {share:.0%} of its answers on task {task} stopped at max_new_tokens "
                       f"(warning above {self.threshold:.0%}); a short limit rewards brief answers: raise the "
                       "task's max_new_tokens (or engine.max_new_tokens). Shares are in children.jsonl "
                       "(truncated); this warning is given once a run")
        log.warning(self.warned)
        return self.warned
