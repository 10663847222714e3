"""A stop signal is not an error: library code's ``except Exception`` does not swallow it."""
from __future__ import annotations

import os
import signal
import time

import pytest

from cycleqd.evolve.signals import RunInterrupted, StopSignals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_inside_a_broad_except_still_stops(signum: int) -> None:
    """Raised where the main thread is, e.g. inside a model loader's or a task's ``try/except Exception``."""
    swallowed = []
    with StopSignals(), pytest.raises(RunInterrupted) as e:
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler runs here, at the latest
        except Exception as err:  # noqa: BLE001 - what library code does
            swallowed.append(err)
    assert e.value.signum == signum and swallowed == []
    assert signal.getsignal(signum) is not StopSignals._handle  # the handlers are restored afterwards
