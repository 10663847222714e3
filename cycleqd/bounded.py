"""Bounded readers of the JSON a run folder holds: no line, file or nesting can exhaust the reader.

``json.loads`` recurses once per nesting level and reads whatever size it is
given, so a line of 100,000 ``[`` (RecursionError) or a multi-gigabyte line
(MemoryError) would crash every command that reads the folder, ``check``
included. Every JSON a run folder holds (log lines, seeds, snapshots, genome
headers) is read through :func:`loads_bounded`: the size is checked first, then
the nesting depth is measured without recursion, and only then is it parsed.

Python text read on the host (a DB answer, MBPP tests) is parsed through
:func:`parse_python`: CPython 3.11 keeps the AST builder's depth counter per
interpreter, not per thread, so ``ast.parse`` raises ``SystemError`` ("AST
constructor recursion depth mismatch") when a garbage collection inside it lets
another thread parse at the same time (a worker's engine or Ray threads).
"""
from __future__ import annotations

import ast
import gc
import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

MAX_DEPTH = 64  # our records nest 4 levels deep; a parser's recursion limit is ~1000
MAX_LINE_BYTES = 16 << 20  # one log line (a child record, an episode's conversation)
MAX_FILE_BYTES = 256 << 20  # one JSON file (archives.json of the largest archives is a few MB)

# a JSON string (with escapes), so brackets inside strings are not counted as nesting
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


_AST_RACE = "recursion depth mismatch"
_AST_TRIES = 8


def parse_python(text: str, mode: str = "exec") -> ast.AST:
    """``ast.parse(text, mode=mode)``, safe from other threads parsing at the same time.

    The garbage collector, whose callbacks and finalizers may hand the interpreter to
    another thread, is off while the tree is built; a tree still spoilt by another
    thread is built again.

    Raises:
        SyntaxError, ValueError, RecursionError, MemoryError: as ``ast.parse``.
    """
    for attempt in range(_AST_TRIES):
        collecting = gc.isenabled()
        gc.disable()
        try:
            return ast.parse(text, mode=mode)
        except SystemError as e:
            if _AST_RACE not in str(e) or attempt == _AST_TRIES - 1:
                raise
        finally:
            if collecting:
                gc.enable()
    raise AssertionError("unreachable")


class TooLarge(ValueError):
    """JSON over a size or depth bound (a ValueError, like any other unreadable JSON)."""


def json_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in ``data`` (brackets in strings do not count), without recursion."""
    a = np.frombuffer(_STRING.sub(b'""', data), np.uint8)
    step = np.isin(a, _OPEN).astype(np.int64) - np.isin(a, _CLOSE).astype(np.int64)
    return int(np.cumsum(step).max(initial=0))


def loads_bounded(data: bytes | str, *, max_bytes: int = MAX_FILE_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(data)`` after checking its size and nesting depth.

    Raises:
        TooLarge: over ``max_bytes`` or nested deeper than ``max_depth``.
        ValueError: not JSON (``json.JSONDecodeError``, ``UnicodeDecodeError``).
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise TooLarge(f"{len(raw)} bytes, over the {max_bytes}-byte bound")
    # the bracket count bounds the depth: only a document with more brackets is measured
    depth = raw.count(b"[") + raw.count(b"{")
    if depth > max_depth and (depth := json_depth(raw)) > max_depth:
        raise TooLarge(f"nested {depth} levels deep, over the bound of {max_depth}")
    return json.loads(raw)


def read_json_file(path: Path, *, max_bytes: int = MAX_FILE_BYTES) -> Any:
    """A whole JSON file, bounded (its size is checked before it is read).

    Raises:
        OSError; TooLarge; ValueError: not JSON.
    """
    size = path.stat().st_size
    if size > max_bytes:
        raise TooLarge(f"{size} bytes, over the {max_bytes}-byte bound")
    with open(path, "rb") as f:
        return loads_bounded(f.read(max_bytes + 1), max_bytes=max_bytes)


def iter_lines(path: Path, *, max_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None, bool]]:
    """``(line number, line, complete)`` per line, reading at most ``max_bytes + 1`` bytes at a time.

    A line over ``max_bytes`` is given as ``None`` (its bytes are skipped, never held);
    ``complete`` is False for a last line without its newline (a torn write).
    """
    with open(path, "rb") as f:
        n = 0
        while True:
            raw = f.readline(max_bytes + 1)
            if not raw:
                return
            n += 1
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                complete = False
                while True:  # skip the rest of the oversized line
                    chunk = f.readline(1 << 20)
                    if not chunk:
                        break
                    if chunk.endswith(b"\n"):
                        complete = True
                        break
                yield n, None, complete
                continue
            yield n, raw, raw.endswith(b"\n")
