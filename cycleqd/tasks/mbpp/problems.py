"""MBPP and MBPP+ rows as :class:`Problem` records (ids, prompts, entry points, base inputs)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

from cycleqd.config import ConfigError


def split_docstring(prompt: str) -> tuple[str, str]:
    """(text, assertion) of an MBPP+ prompt as the official code splits it.

    The docstring body is what lies between the first and the last triple quote; the
    text is what comes before its first ``assert``, the assertion the rest.

    Raises:
        ConfigError: the prompt has no docstring or no ``assert`` in it.
    """
    first, last = prompt.find('"""'), prompt.rfind('"""')
    if first == -1 or last <= first:
        raise ConfigError(f"MBPP+ prompt without a docstring: {prompt[:60]!r}")
    body = prompt[first + 3:last]
    at = body.find("assert")
    if at == -1:
        raise ConfigError(f"MBPP+ prompt without an assertion: {prompt[:60]!r}")
    return body[:at].strip(), body[at:].strip()


@dataclass(frozen=True)
class Problem:
    """One MBPP problem: what the model is shown and how a solution is tested."""

    id: str
    text: str                  # the problem text (official instruction, before the assertion)
    assertion: str             # the one test shown to the model
    docstring: str             # EvalPlus-style prompt: docstring with the text and one test
    entry_point: str           # the function the tests call
    tests: str = ""            # assertions run after the solution ("" when judged by base inputs)
    setup: str = ""            # test_setup_code, run after the solution, before the tests
    reference: str = ""        # a known-correct solution, when the data has one
    base_inputs: tuple | None = None  # EvalPlus base inputs (argument lists), judged against reference
    atol: float = 0.0
    plus: bool = False         # the row came from MBPP+


# -- data --------------------------------------------------------------------------------------
_CALLED = re.compile(r"([A-Za-z_]\w*)\s*\(")
_NOT_ENTRY = {"assert", "set", "sorted", "list", "tuple", "abs", "round", "math", "isclose", "not", "str",
              "int", "float", "len", "frozenset", "dict", "all", "any", "type", "bool"}


def entry_point_of(test: str, code: str = "") -> str:
    """The function an MBPP assert calls: the first called name that is not a builtin wrapper
    (``set(...)``, ``math.isclose(...)``); one ``code`` defines, when given, is preferred;
    ``""`` for a test that calls no function."""
    names = [n for n in _CALLED.findall(test) if n not in _NOT_ENTRY]
    defined = [n for n in names if re.search(rf"def\s+{re.escape(n)}\s*\(", code)]
    return (defined or names or [""])[0]


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _each_tuple(args: list) -> list:
    return [tuple(a) for a in args]


def _inner_tuples(args: list) -> list:
    return [[tuple(v) for v in a] for a in args]


# MBPP+ v0.1.0 stores tuple / set / complex arguments as JSON lists; EvalPlus turns them back per
# problem before running anything (its mbpp_deserialize_inputs). Problem number -> conversion.
_ARG_CONVERSIONS: dict[int, Any] = {
    **dict.fromkeys([2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630, 726,
                     740, 744, 809], _each_tuple),
    **dict.fromkeys([63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780], _inner_tuples),
    **dict.fromkeys([75, 413, 444, 753], lambda a: [[tuple(v) for v in a[0]], a[1]]),
    **dict.fromkeys([106, 750], lambda a: [a[0], tuple(a[1])]),
    115: lambda a: [[set(v) if isinstance(v, list) and v else {} for v in a[0]]],
    124: lambda a: (float(a[0]), complex(a[1])),
    **dict.fromkeys([250, 405, 446, 617, 720, 763, 808], lambda a: [tuple(a[0]), a[1]]),
    **dict.fromkeys([259, 401, 445], lambda a: [tuple(tuple(v) for v in x) for x in a]),
    278: lambda a: [tuple(tuple(v) if isinstance(v, list) else v for v in a[0])],
    307: lambda a: [tuple(a[0]), a[1], a[2]],
    722: lambda a: [{k: tuple(v) for k, v in a[0].items()}, *a[1:]],
    252: lambda a: [complex(a[0])],
    **dict.fromkeys([580, 615, 791], _tuples),
}


def deserialize_inputs(task_id: str, inputs: Sequence[Any]) -> list:
    """MBPP+ base inputs with the argument types EvalPlus restores for problem ``task_id`` (``Mbpp/N``).

    Raises:
        ConfigError: inputs of a converted problem that do not have MBPP+'s shape.
    """
    try:
        number = int(str(task_id).rsplit("/", 1)[-1])
    except ValueError:
        return list(inputs)
    convert = _ARG_CONVERSIONS.get(number)
    if convert is None:
        return list(inputs)
    try:
        return [convert(list(args)) for args in inputs]
    except (TypeError, ValueError, IndexError, AttributeError) as e:
        why = f"{type(e).__name__}: {e}"
        raise ConfigError(f"{task_id}: base_input is not shaped like MBPP+ v0.1.0's ({why})") from None


def _docstring_prompt(text: str, test: str) -> str:
    return f'"""\n{text.strip()}\n{test.strip()}\n"""\n'


def problem_from_row(row: dict) -> Problem:
    """One MBPP or MBPP+ row as a :class:`Problem`. Raises ConfigError for a row of neither shape."""
    tid = row.get("task_id")
    if tid is None:
        raise ConfigError("MBPP record without task_id")
    # original MBPP, or the Hub's MBPP+ rows, whose prompt is MBPP's plain text with its test_list
    hub_like = "prompt" in row and '"""' not in str(row["prompt"]) and row.get("test_list")
    if "test_list" in row and ("text" in row and "prompt" not in row or hub_like):
        tests = list(row["test_list"] or [])
        if not tests:
            raise ConfigError(f"MBPP record {tid}: empty test_list")
        code = row.get("code") or ""
        text = row["text"] if "text" in row else str(row["prompt"])
        return Problem(id=str(tid), text=text, assertion=tests[0],
                       docstring=_docstring_prompt(text, tests[0]),
                       entry_point=entry_point_of(tests[0], code), tests="\n".join(tests),
                       setup=row.get("test_setup_code") or "\n".join(row.get("test_imports") or []), reference=code)
    if "prompt" in row:  # EvalPlus MBPP+
        text, assertion = split_docstring(row["prompt"])
        entry = row.get("entry_point") or entry_point_of(assertion, row.get("canonical_solution") or "")
        inputs = row.get("base_input")
        if isinstance(inputs, str):
            inputs = json.loads(inputs)
        asserts = row.get("assertion") or "\n".join(row.get("test_list") or [])
        if inputs is None and not asserts:
            raise ConfigError(f"MBPP+ record {tid}: no base_input, assertion or test_list")
        if inputs is not None and not row.get("canonical_solution"):
            raise ConfigError(f"MBPP+ record {tid}: base_input needs the canonical_solution")
        return Problem(id=str(tid), text=text, assertion=assertion, docstring=row["prompt"], entry_point=entry,
                       tests=asserts or "", reference=row.get("canonical_solution") or row.get("code") or "",
                       base_inputs=tuple(deserialize_inputs(tid, inputs)) if inputs is not None else None,
                       atol=float(row.get("atol") or 0.0), plus=True)
    raise ConfigError(f"record {tid}: neither MBPP (text, test_list) nor MBPP+ (prompt) fields")
