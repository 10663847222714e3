"""The test programs a solution runs in the sandbox: EvalPlus base tests (the template
``base_tests.py.tmpl`` beside this module) and the row's own asserts."""
from __future__ import annotations

import ast
import base64
import pickle
import re
from pathlib import Path

from cycleqd.tasks.mbpp.problems import Problem

MIN_TIME_LIMIT = 0.2      # EvalPlus: seconds per base input at least ...
TIME_LIMIT_FACTOR = 4.0   # ... and this many times the canonical solution's time
FLOAT_ATOL = 1e-6         # EvalPlus's tolerance when the expected output is a float
_BASE_TESTS = (Path(__file__).parent / "base_tests.py.tmpl").read_text()


# -- test programs -----------------------------------------------------------------------------


def base_test_program(problem: Problem, solution: str, passed: str) -> str:
    """A program that prints ``passed`` iff ``solution`` passes the EvalPlus base tests of ``problem``."""
    pickled = base64.b64encode(pickle.dumps(list(problem.base_inputs or ()))).decode()
    values = {"REFERENCE": repr(problem.reference), "SOLUTION": repr(solution), "ENTRY": repr(problem.entry_point),
              "PICKLED_INPUTS": repr(pickled), "ATOL": repr(problem.atol), "PASSED": repr(passed),
              "MIN_TIME": repr(MIN_TIME_LIMIT), "FACTOR": repr(TIME_LIMIT_FACTOR), "FLOAT_ATOL": repr(FLOAT_ATOL)}
    return re.sub(r"\b(" + "|".join(values) + r")\b", lambda m: values[m.group(1)], _BASE_TESTS)


def probe_call(assertion: str) -> str | None:
    """The call an assertion checks (``f(x)`` of ``assert f(x) == y``), as source; None if there is none."""
    try:
        tree = ast.parse(assertion.strip())
    except SyntaxError:
        return None
    node = tree.body[0] if tree.body else None
    test = node.test if isinstance(node, ast.Assert) else None
    if isinstance(test, ast.Compare):
        return ast.unparse(test.left)
    if isinstance(test, ast.Call):  # assert math.isclose(f(x), y) / assert set(f(x)) == ...
        return ast.unparse(test.args[0]) if test.args else None
    return None


def probe_program(solution: str, assertion: str) -> str:
    """A program that prints ``repr`` of the shown assertion's call on ``solution`` (or the exception raised)."""
    call = probe_call(assertion) or "None"
    return (f"{solution}\n\ntry:\n    print(repr({call}))\nexcept Exception as e:\n"
            f"    print('raised', type(e).__name__)\n")


def build_test_program(problem: Problem, solution: str, passed: str = "") -> str:
    """A program that passes iff ``solution`` passes the problem's asserts (and then prints ``passed``).

    The set-up code runs after the solution: in MBPP it builds test inputs from the
    solution's own classes (e.g. tree ``Node`` objects).
    """
    tail = f"\nprint({passed!r}, flush=True)\n" if passed else "\n"
    return f"{solution}\n\n{problem.setup}\n{problem.tests}\n{tail}"
