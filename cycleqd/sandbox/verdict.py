"""Verdicts an answer cannot reach: the job gives values, the trusted side judges them.

A test program that runs the candidate's code and then its own asserts can be fooled by
the candidate: it can exit 0 early, find a pass marker by walking the calling frames,
patch ``math.isclose`` or ``set``, or return an object whose ``__eq__`` is always true.
Here nothing the job does decides the verdict:

1. The trusted side (this process) splits each assertion with the ``ast``: the
   sub-expressions that depend on the candidate (calls of a name the trusted side does
   not know: the candidate's functions, its classes, set-up code's objects) go to the
   job; the rest of the assertion (comparisons, ``math.isclose``, ``set(...)``, the
   expected values) stays here. ``assert math.isclose(f(1, 2), 3.5, rel_tol=0.001)``
   sends the job ``f(1, 2)`` only.
2. The job (one sandbox job per program, :func:`evaluate_calls_batch`) runs the program
   and the set-up, evaluates those expressions and writes their values to a descriptor
   of its own, encoded strictly: only exact ``None, bool, int, float, complex, str,
   bytes, list, tuple, dict, set, frozenset`` (no subclasses), bounded in depth and size.
   A job that exits early, crashes or times out gives no values, and every assertion fails.
3. The trusted side decodes the values (bounded, no ``eval`` of job text) and evaluates
   the rest of each assertion over them, with the real builtins and trusted modules.

Exit status, stdout and anything printed play no role. The names the trusted side
knows are the builtins, the modules of :data:`TRUSTED_MODULES` and the names the test
imports bind; a candidate that redefines one of them (``set = ...``) changes only its
own process. ``candidate_names`` forces names to the job (an entry point that shares a
builtin's name). A comprehension stays on the trusted side when its candidate parts do
not use its variables (``all(x > 0 for x in f(1))`` sends ``f(1)``); one whose candidate
calls use them (``all(f(x) for x in range(3))``) is evaluated in the job as a whole, as
a list: the job then decides that part of the assertion, so such shapes are weaker.
"""
from __future__ import annotations

import ast
import builtins
import copy
import importlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from cycleqd.bounded import parse_python
from cycleqd.sandbox import _runner
from cycleqd.sandbox.backends import RunResult, get_backend

TRUSTED_MODULES = frozenset({"math", "cmath", "re", "collections", "itertools", "functools", "operator",
                             "heapq", "bisect", "string", "statistics", "fractions", "decimal", "copy"})
_VALUE = "_cq_v"  # names the trusted side gives the job's values in a rewritten assertion


@dataclass(frozen=True)
class CallJob:
    """One program and the expressions to evaluate after it (and ``setup``) in one job.

    ``inputs`` (plain values) are visible to the expressions as ``_cq_inputs``;
    ``call_timeout`` bounds each expression (one number, or one per call).
    """

    program: str
    calls: tuple[str, ...]
    setup: str = ""
    inputs: tuple = ()
    call_timeout: float | tuple[float, ...] | None = None


@dataclass(frozen=True)
class CallOutcome:
    """One expression's outcome: ``ok`` with its ``value``, or ``error`` (raised / no plain value).

    ``seconds`` is what the job measured (informative only: the job could lie).
    """

    ok: bool
    value: Any = None
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class CallsResult:
    """A job's outcomes, or ``outcomes=None`` and ``error`` when it gave no values."""

    outcomes: list[CallOutcome] | None
    run: RunResult
    error: str | None = None


@dataclass(frozen=True)
class AssertVerdict:
    """One assertion judged: ``passed``, else ``error`` says why not."""

    assertion: str
    passed: bool
    error: str | None = None


@dataclass(frozen=True)
class AssertJob:
    """A candidate program and the assertions it must pass (see :func:`check_asserts`)."""

    program: str
    asserts: tuple[str, ...]
    setup: str = ""
    imports: str = ""
    candidate_names: tuple[str, ...] = ()


# -- the job side ---------------------------------------------------------------------------
def _why_no_values(run: RunResult) -> str:
    if run.error:
        return run.error
    tail = (run.stderr.strip().splitlines() or [""])[-1]
    return f"the program gave no values (exit code {run.returncode}{': ' + tail[:200] if tail else ''})"


def evaluate_calls_batch(jobs: Sequence[CallJob], *, timeout: float = 5.0, memory_mb: int = 512,
                         backend: str = "auto") -> list[CallsResult]:
    """Evaluate each job's calls in the sandbox (one launch for all jobs); decode the values here.

    Never raises for a bad program: its result has ``outcomes=None`` and the reason.

    Raises:
        SandboxUnavailable, UnsafeBackend, ValueError: the backend cannot be used (configuration).
    """
    if not jobs:
        return []
    specs = []
    for job in jobs:
        limits = list(job.call_timeout) if isinstance(job.call_timeout, tuple) else job.call_timeout
        specs.append({"kind": "calls", "code": job.program, "setup": job.setup, "calls": list(job.calls),
                      "inputs": _runner.encode_value(list(job.inputs)), "call_timeout": limits})
    runs = get_backend(backend).run_batch(specs, timeout=timeout, memory_mb=memory_mb)
    out = []
    for job, run in zip(jobs, runs):
        if not run.result or not run.finished:
            out.append(CallsResult(None, run, _why_no_values(run)))
            continue
        try:
            decoded = _runner.decode_results(run.result)
        except ValueError as e:
            out.append(CallsResult(None, run, f"unreadable values: {e}"))
            continue
        if len(decoded) != len(job.calls):
            out.append(CallsResult(None, run, "values for the wrong number of calls"))
            continue
        outcomes = []
        for status, what, seconds in decoded:
            if status == "ok":
                outcomes.append(CallOutcome(True, what, None, seconds))
            elif status == "raised":
                outcomes.append(CallOutcome(False, None, f"raised {what}", seconds))
            else:
                outcomes.append(CallOutcome(False, None, f"no plain value: {what}", seconds))
        out.append(CallsResult(outcomes, run))
    return out


# -- the trusted side -----------------------------------------------------------------------
def parse_tests(text: str) -> tuple[str, list[str]]:
    """``(imports, asserts)`` of a block of test code (imports and ``assert`` statements only).

    Raises:
        ValueError: the block does not parse, or holds another kind of statement.
    """
    try:
        tree = parse_python(text)
    except SyntaxError as e:
        raise ValueError(f"test code does not parse: {e}") from None
    imports, asserts = [], []
    for node in tree.body:
        src = ast.get_source_segment(text, node) or ast.unparse(node)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(src)
        elif isinstance(node, ast.Assert):
            asserts.append(src)
        else:
            raise ValueError(f"test code holds a {type(node).__name__} statement, not only imports and asserts")
    return "\n".join(imports), asserts


def trusted_namespace(imports: str = "") -> dict[str, Any]:
    """The names an assertion's trusted part may use: builtins, :data:`TRUSTED_MODULES`, ``imports``.

    Raises:
        ValueError: ``imports`` holds anything but import statements, or a module is missing.
    """
    ns: dict[str, Any] = {"__builtins__": builtins.__dict__}
    for name in TRUSTED_MODULES:
        ns[name] = importlib.import_module(name)
    if not imports.strip():
        return ns
    try:
        tree = parse_python(imports)
    except SyntaxError as e:
        raise ValueError(f"test imports do not parse: {e}") from None
    for node in tree.body:
        try:
            if isinstance(node, ast.Import):
                for a in node.names:
                    mod = importlib.import_module(a.name)
                    if a.asname:
                        ns[a.asname] = mod
                    else:
                        top = a.name.split(".")[0]
                        ns[top] = importlib.import_module(top)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mod = importlib.import_module(node.module)
                for a in node.names:
                    if a.name == "*":
                        raise ValueError("test imports: 'import *' is not allowed")
                    ns[a.asname or a.name] = getattr(mod, a.name)
            else:
                raise ValueError(f"test imports hold a {type(node).__name__} statement")
        except (ImportError, AttributeError) as e:
            raise ValueError(f"test import failed: {e}") from None
    return ns


_SCOPES = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Lambda)


def _locals(tree: ast.AST) -> set[str]:
    """Names bound inside the expression (comprehension targets, lambda arguments, walrus)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.comprehension):
            out.update(n.id for n in ast.walk(node.target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Lambda):
            out.update(a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg))
        elif isinstance(node, ast.NamedExpr):
            out.add(node.target.id)
    return out


class _Split(ast.NodeTransformer):
    """Replaces each candidate-dependent sub-expression by a name; collects their sources."""

    def __init__(self, trusted: set[str], forced: set[str], local: set[str]):
        self.trusted, self.forced, self.local = trusted, forced, local
        self.calls: list[str] = []

    def _untrusted(self, node: ast.AST) -> bool:
        return any(isinstance(n, ast.Name) and (n.id in self.forced or n.id not in self.trusted
                                               and n.id not in self.local)
                   for n in ast.walk(node))

    def _to_job(self, node: ast.expr) -> ast.expr:
        free = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} & (self.local - _locals(node))
        if free:  # it needs a comprehension's variable: the enclosing comprehension goes instead
            raise _NeedsScope()
        if isinstance(node, ast.GeneratorExp):  # a generator is no value: its items are
            node = ast.ListComp(elt=node.elt, generators=node.generators)
        self.calls.append(ast.unparse(node))
        return ast.copy_location(ast.Name(id=f"{_VALUE}{len(self.calls) - 1}", ctx=ast.Load()), node)

    def visit(self, node: ast.AST) -> ast.AST:
        if not isinstance(node, ast.expr) or not self._untrusted(node):
            return self.generic_visit(node) if not isinstance(node, ast.expr) else node
        if isinstance(node, _SCOPES):
            # The comprehension stays here when only parts free of its variables are the
            # candidate's (``all(x > 0 for x in f(1))``); else it goes to the job whole.
            mark = len(self.calls)
            try:
                return self.generic_visit(copy.deepcopy(node))
            except _NeedsScope:
                del self.calls[mark:]
                return self._to_job(node)
        if isinstance(node, ast.Name):
            return self._to_job(node)
        if isinstance(node, ast.Call):
            if self._untrusted(node.func):
                return self._to_job(node)
            node.args = [self.visit(a) for a in node.args]
            node.keywords = [self.visit(k) for k in node.keywords]
            return node
        if isinstance(node, ast.Attribute):  # an attribute of a candidate's object is its behaviour
            return self._to_job(node)
        return self.generic_visit(node)


class _NeedsScope(Exception):
    pass


@dataclass(frozen=True)
class SplitAssert:
    """An assertion split in two: ``calls`` for the job, ``test`` (an expression over
    ``_cq_v0``, ``_cq_v1``, ... standing for their values) for the trusted side."""

    assertion: str
    test: ast.Expression | None
    calls: tuple[str, ...] = ()
    error: str | None = None


def split_assert(assertion: str, trusted: Iterable[str], candidate_names: Iterable[str] = ()) -> SplitAssert:
    """Split one ``assert`` statement (see the module docstring); ``error`` when it is not one."""
    try:
        tree = parse_python(assertion.strip())
    except (SyntaxError, ValueError) as e:
        return SplitAssert(assertion, None, (), f"assertion does not parse: {e}")
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return SplitAssert(assertion, None, (), "not a single assert statement")
    test = tree.body[0].test
    splitter = _Split(set(trusted), set(candidate_names), _locals(test))
    new = splitter.visit(test)
    expr = ast.fix_missing_locations(ast.Expression(body=new))
    return SplitAssert(assertion, expr, tuple(splitter.calls))


def _judge(split: SplitAssert, outcomes: Sequence[CallOutcome], ns: dict[str, Any]) -> AssertVerdict:
    for call, outcome in zip(split.calls, outcomes):
        if not outcome.ok:
            return AssertVerdict(split.assertion, False, f"{call[:120]}: {outcome.error}")
    scope = dict(ns)
    scope.update({f"{_VALUE}{k}": o.value for k, o in enumerate(outcomes)})
    try:
        ok = eval(compile(split.test, "<assert>", "eval"), scope)  # noqa: S307 - trusted test over plain values
        passed = bool(ok) if type(ok) in (bool, int, float, str, list, tuple, dict, set, frozenset, type(None)) \
            else False
    except Exception as e:  # the assertion itself raised (a wrong type of value): fails
        return AssertVerdict(split.assertion, False, f"{type(e).__name__}: {str(e)[:200]}")
    return AssertVerdict(split.assertion, passed, None if passed else "assertion failed")


def check_asserts_batch(jobs: Sequence[AssertJob], *, timeout: float = 5.0, memory_mb: int = 512,
                        backend: str = "auto") -> list[list[AssertVerdict]]:
    """Judge many programs' assertions with one sandbox launch (one job per program).

    Returns one list of verdicts per job, one verdict per assertion, in order.

    Raises:
        ValueError: a job's ``imports`` are not plain import statements (bad test data);
            also SandboxUnavailable / UnsafeBackend for an unusable backend.
    """
    namespaces: dict[str, dict[str, Any]] = {}
    plans = []
    for job in jobs:
        if job.imports not in namespaces:
            namespaces[job.imports] = trusted_namespace(job.imports)
        ns = namespaces[job.imports]
        trusted = set(ns) | set(dir(builtins))
        splits = [split_assert(a, trusted, job.candidate_names) for a in job.asserts]
        calls = [c for s in splits for c in s.calls]
        setup = "\n".join(x for x in (job.imports, job.setup) if x.strip())
        plans.append((ns, splits, CallJob(job.program, tuple(calls), setup)))
    results = evaluate_calls_batch([p[2] for p in plans], timeout=timeout, memory_mb=memory_mb, backend=backend)
    out = []
    for (ns, splits, _), res in zip(plans, results):
        verdicts, at = [], 0
        for s in splits:
            if s.error:
                verdicts.append(AssertVerdict(s.assertion, False, s.error))
            elif res.outcomes is None:
                verdicts.append(AssertVerdict(s.assertion, False, res.error))
            else:
                verdicts.append(_judge(s, res.outcomes[at:at + len(s.calls)], ns))
            at += len(s.calls)
        out.append(verdicts)
    return out


def check_asserts(program: str, asserts: Sequence[str], *, setup: str = "", imports: str = "",
                  candidate_names: Sequence[str] = (), timeout: float = 5.0, memory_mb: int = 512,
                  backend: str = "auto") -> list[AssertVerdict]:
    """Judge ``program`` on each assertion: one :class:`AssertVerdict` per assertion.

    ``setup`` runs in the job after the program (it may use the program's classes);
    ``imports`` (import statements) run in the job and give the trusted side its names.
    """
    job = AssertJob(program, tuple(asserts), setup, imports, tuple(candidate_names))
    return check_asserts_batch([job], timeout=timeout, memory_mb=memory_mb, backend=backend)[0]


__all__ = [
    "AssertJob",
    "AssertVerdict",
    "CallJob",
    "CallOutcome",
    "CallsResult",
    "SplitAssert",
    "TRUSTED_MODULES",
    "check_asserts",
    "check_asserts_batch",
    "evaluate_calls_batch",
    "parse_tests",
    "split_assert",
    "trusted_namespace",
]
