"""Run folders the tests of cycleqd.runs damage: a private copy of one finished run each."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from run_helpers import real_run


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 8-child run (made once per process, see run_helpers.real_run)."""
    return real_run(tmp_path_factory)


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A private copy of a finished run, free to damage."""
    return Path(shutil.copytree(finished, tmp_path / "run"))
