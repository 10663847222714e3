"""Fixtures shared by the engine tests: a tiny world and vLLM's small KV cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_models import make_tiny_family


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A random tiny Llama base with experts code / sql / shell, laid out as the mini world is.

    Head size 32 (vLLM's CPU attention takes 32, not the tiny mini recipe's 16);
    random weights write long, varied completions, so greedy comparisons cover
    many tokens.
    """
    root = tmp_path_factory.mktemp("world")
    make_tiny_family(root, tasks=("code", "sql", "shell"), hidden=128, layers=2, vocab=64)
    return root


@pytest.fixture(scope="session", autouse=True)
def _small_kv_cache():
    # One small KV cache per vLLM engine: the tests' prompts are short.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    yield
