"""Fixtures for the real tasks: the shared benchmark data (MariaDB is in tests/conftest.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The public benchmark data folder beside the checkout (skips where it is absent)."""
    if not DATA.is_dir():
        pytest.skip(f"benchmark data folder {DATA} is absent (only on the development machine)")
    return DATA
