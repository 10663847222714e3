"""How a solution is judged: jobs for :mod:`cycleqd.sandbox.verdict`, and EvalPlus's output comparison.

Nothing here makes the candidate's own process decide its verdict. Asserts are split by
the verdict module (the candidate's calls run in the job, the comparisons here); EvalPlus
base inputs run in two jobs, the reference solution's (whose values are the expected
outputs) and the candidate's, and :func:`same_output` compares their values here.
"""
from __future__ import annotations

import ast
from typing import Any, Sequence

from cycleqd.sandbox.verdict import AssertJob, CallJob, parse_tests
from cycleqd.tasks.mbpp.problems import Problem

MIN_TIME_LIMIT = 0.2      # EvalPlus: seconds per base input at least ...
TIME_LIMIT_FACTOR = 4.0   # ... and this many times the canonical solution's time
FLOAT_ATOL = 1e-6         # EvalPlus's tolerance when the expected output is a float

# Problems whose output EvalPlus compares loosely (see :func:`same_output`).
_ANY_OUTPUT = frozenset({"are_equivalent"})
_SOMETHING_RETURNED = frozenset({"check_str", "text_match_three", "text_starta_endb"})


# -- asserts -----------------------------------------------------------------------------------
def _only_imports(code: str) -> bool:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body)


def assert_job(problem: Problem, solution: str) -> AssertJob:
    """The verdict job of ``solution`` on the problem's own asserts (``tests``, after ``setup``).

    Set-up code that is only imports (the Hub's ``test_imports``) gives the trusted side its
    names too; other set-up (MBPP's tree ``Node`` objects) runs in the job after the solution.

    Raises:
        ValueError: the tests hold statements other than imports and asserts (bad data).
    """
    imports, asserts = parse_tests(problem.tests)
    setup = problem.setup
    if setup.strip() and _only_imports(setup):
        imports, setup = "\n".join(x for x in (setup, imports) if x.strip()), ""
    entry = (problem.entry_point,) if problem.entry_point else ()
    return AssertJob(solution, tuple(asserts), setup=setup, imports=imports, candidate_names=entry)


# -- EvalPlus base inputs ----------------------------------------------------------------------
def base_calls_job(problem: Problem, program: str, limits: Sequence[float] | None = None) -> CallJob:
    """A job that calls the entry point of ``program`` on each base input (a fresh deep copy each).

    ``limits`` are the seconds each call may take (the candidate's; None for the reference).
    Only a function the program itself defines is called: a missing entry point gives no values.
    The regex-match problems return match objects, which are no plain value; only whether
    something was returned is compared (:func:`same_output`), so their job gives that.
    """
    entry = problem.entry_point
    setup = f"import copy as _cq_copy\n_cq_f = globals()[{entry!r}]\n"
    call = "(_cq_f(*_cq_copy.deepcopy(_cq_inputs[{k}])) is not None)" if entry in _SOMETHING_RETURNED \
        else "_cq_f(*_cq_copy.deepcopy(_cq_inputs[{k}]))"
    calls = tuple(call.format(k=k) for k in range(len(problem.base_inputs or ())))
    return CallJob(program, calls, setup=setup, inputs=tuple(problem.base_inputs or ()),
                   call_timeout=tuple(limits) if limits is not None else None)


def time_limits(reference_seconds: Sequence[float]) -> list[float]:
    """EvalPlus's per-input limits: max(MIN_TIME_LIMIT, TIME_LIMIT_FACTOR x the reference's seconds)."""
    return [max(MIN_TIME_LIMIT, TIME_LIMIT_FACTOR * s) for s in reference_seconds]


def _floats(x: Any) -> bool:
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and all(isinstance(v, float) for v in x)
    return isinstance(x, float)


def _flat(x: Any, out: list) -> list:
    if isinstance(x, (list, tuple)):
        for v in x:
            _flat(v, out)
    else:
        out.append(x)
    return out


def _close(out: Any, exp: Any, atol: float) -> bool:
    if isinstance(exp, (list, tuple)) and (not isinstance(out, (list, tuple)) or len(out) != len(exp)):
        return False
    a, b = _flat(out, []), _flat(exp, [])
    if len(a) != len(b):
        return False
    try:
        return all(abs(x - y) <= atol + 1e-07 * abs(y) for x, y in zip(a, b))
    except TypeError:
        return False


def same_output(out: Any, exp: Any, entry: str, atol: float) -> bool:
    """EvalPlus's base-test comparison of a candidate's output with the reference's (plain values).

    Exact equality; floats (and lists of them) within ``atol`` (FLOAT_ATOL when the row gives
    none); and the problems EvalPlus special-cases: ``are_equivalent`` accepts any output,
    ``sum_div`` also 0, and the regex-match problems only compare "returned something" (their
    jobs give ``output is not None``, see :func:`base_calls_job`).
    Never raises (a comparison that raises is a mismatch).
    """
    try:
        if entry in _ANY_OUTPUT:
            return True
        if entry in _SOMETHING_RETURNED:  # the jobs gave ``output is not None`` (see base_calls_job)
            return type(out) is bool and out is exp
        exact = bool(out == exp)
        if entry == "sum_div":
            return bool(exact or out == 0)
        if atol == 0 and _floats(exp):
            atol = FLOAT_ATOL
        if not exact and atol != 0:
            return _close(out, exp, atol)
        return exact
    except Exception:  # e.g. RecursionError on a self-nested list
        return False


# -- the voting probe (scores nothing) ---------------------------------------------------------
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
    """A program that prints ``repr`` of the shown assertion's call on ``solution`` (or the exception raised).

    For a team's vote only (answers that print the same behave alike); it scores nothing.
    """
    call = probe_call(assertion) or "None"
    return (f"{solution}\n\ntry:\n    print(repr({call}))\nexcept Exception as e:\n"
            f"    print('raised', type(e).__name__)\n")
