"""Shared fixtures: a tiny random Llama family on disk."""
from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import make_tiny_family


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Session-wide tiny family with tasks a, b, c (see :func:`make_tiny_family`)."""
    return make_tiny_family(tmp_path_factory.mktemp("family"))
