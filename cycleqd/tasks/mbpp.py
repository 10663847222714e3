"""MBPP / MBPP+ code generation, pass@1 with greedy decoding on the base tests.

Reads either the original MBPP JSONL (``task_id, text, code, test_list,
test_setup_code``) or EvalPlus MBPP+ (``task_id`` like ``"Mbpp/2"``, ``prompt``,
``canonical_solution``, ``entry_point``, ``assertion`` or ``base_input``), or a Hub
id ``hf://evalplus/mbppplus`` (needs ``datasets`` and a network).

The prompt is the CycleQD one: a system line, then ``@@ Instruction:`` with the
EvalPlus-style problem (text plus one test), then ``@@ Response:``. The completion is
sanitized (code block extracted, only imports / definitions / constants kept) and
run with the base tests in the sandbox, all samples in one sandbox batch.
"""
from __future__ import annotations

import ast
import json
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from pydantic import BaseModel, ConfigDict

from cycleqd.config import ConfigError, SandboxConfig
from cycleqd.engine.base import Engine, GenRequest
from cycleqd.registry import register_task
from cycleqd.sandbox import require_code_execution, run_python_batch
from cycleqd.tasks._agent import read_rows, select_ids, task_result
from cycleqd.tasks.base import SampleResult, TaskResult

SYSTEM = ("You are an exceptionally intelligent coding assistant that consistently delivers accurate "
          "and reliable responses to user instructions.")
INSTRUCTION = "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
STOP = ("Instruction:", "Instruction", "Response:", "Response")


@dataclass(frozen=True)
class Problem:
    """One MBPP problem: the prompt body and the program that tests a solution."""

    id: str
    prompt: str          # EvalPlus-style: docstring with the text and one test
    tests: str           # assertions (base tests), run after the solution
    setup: str = ""      # test_setup_code, run before the solution
    reference: str = ""  # a known-correct solution, when the data has one


def chat_prompt(problem_prompt: str) -> str:
    """The full CycleQD code prompt (system line, ``@@ Instruction:``, ``@@ Response:``)."""
    body = f"{INSTRUCTION}\n```\n{problem_prompt.strip()}\n```"
    return f"{SYSTEM}\n\n@@ Instruction:\n{body}\n\n@@ Response:"


_FENCE = re.compile(r"```[ \t]*(?:python|py|Python|python3)?[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code of a completion: the longest ```python block that parses, else the raw text."""
    blocks = [b for b in _FENCE.findall(completion) if b.strip()]
    parsing = [b for b in blocks if _parses(b)]
    if parsing:
        return max(parsing, key=len)
    if blocks:
        return max(blocks, key=len)
    return completion


def _parse(code: str) -> ast.Module:
    with warnings.catch_warnings():  # model code is full of invalid escape sequences
        warnings.simplefilter("ignore")
        return ast.parse(code)


def _parses(code: str) -> bool:
    try:
        _parse(code)
        return True
    except (SyntaxError, ValueError):
        return False


_KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
         ast.Assign, ast.AnnAssign, ast.AugAssign)


def sanitize(completion: str) -> str:
    """Code to test: imports, functions, classes and global assignments of the completion.

    Test calls, prints and ``if __name__ == "__main__"`` blocks are dropped so the
    model's own examples cannot fail (or pass) the sample; a completion cut off by
    the token limit is shortened line by line until it parses.
    """
    code = extract_code(completion).replace("\r\n", "\n")
    lines = code.split("\n")
    tree = None
    for end in range(len(lines), 0, -1):
        try:
            tree = _parse("\n".join(lines[:end]))
            lines = lines[:end]
            break
        except (SyntaxError, ValueError):
            continue
    if tree is None:
        return code  # let it fail in the sandbox with its own SyntaxError
    kept = []
    for node in tree.body:
        if isinstance(node, _KEEP) and not (isinstance(node, ast.Assign) and _calls_only_tests(node)):
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            kept.append("\n".join(lines[first - 1:node.end_lineno]))
    return "\n".join(kept)


def _calls_only_tests(node: ast.Assign) -> bool:
    """``result = f(...)`` style assignments at top level are example runs, not definitions."""
    return isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name) and \
        node.value.func.id in {"input", "print"}


def _docstring_prompt(text: str, test: str) -> str:
    return f'"""\n{text.strip()}\n{test.strip()}\n"""\n'


def _from_row(row: dict) -> Problem:
    tid = row.get("task_id")
    if tid is None:
        raise ConfigError("MBPP record without task_id")
    if "test_list" in row and "text" in row:  # original MBPP
        tests = "\n".join(row["test_list"])
        return Problem(id=str(tid), prompt=_docstring_prompt(row["text"], row["test_list"][0] if row["test_list"] else ""),
                       tests=tests, setup=row.get("test_setup_code") or "", reference=row.get("code") or "")
    if "prompt" in row:  # EvalPlus MBPP+
        if row.get("assertion"):
            tests = row["assertion"]
        elif row.get("test_list"):
            tests = "\n".join(row["test_list"])
        elif "base_input" in row and row.get("entry_point") and row.get("canonical_solution"):
            tests = _differential_tests(row)
        else:
            raise ConfigError(f"MBPP+ record {tid}: no assertion, test_list or base_input")
        return Problem(id=str(tid), prompt=row["prompt"], tests=tests, reference=row.get("canonical_solution") or "")
    raise ConfigError(f"record {tid}: neither MBPP (text, test_list) nor MBPP+ (prompt) fields")


def _differential_tests(row: dict) -> str:
    """Base tests from ``base_input``: compare with the canonical solution's outputs."""
    inputs = row["base_input"]
    if isinstance(inputs, str):
        inputs = json.loads(inputs)
    atol = float(row.get("atol") or 0)
    return (
        "import math as _m\n"
        f"_ref_ns = {{}}\nexec({row['canonical_solution']!r}, _ref_ns)\n"
        f"for _args in {inputs!r}:\n"
        f"    _want = _ref_ns[{row['entry_point']!r}](*_args)\n"
        f"    _got = {row['entry_point']}(*_args)\n"
        f"    if {atol} and isinstance(_want, float):\n"
        f"        assert _m.isclose(_got, _want, abs_tol={atol}), (_args, _got, _want)\n"
        "    else:\n"
        "        assert _got == _want, (_args, _got, _want)\n"
    )


def build_test_program(problem: Problem, solution: str) -> str:
    """The program that passes iff ``solution`` passes the problem's base tests.

    The set-up code runs after the solution: in MBPP it builds test inputs from the
    solution's own classes (e.g. tree ``Node`` objects).
    """
    return f"{solution}\n\n{problem.setup}\n{problem.tests}\n"


@register_task("mbpp")
class MBPPTask:
    """MBPP(+) pass@1 on the base tests (see module docstring).

    Args:
        name: task name in the experiment.
        data: MBPP / MBPP+ JSONL, or ``hf://evalplus/mbppplus``.
        sandbox: the experiment's SandboxConfig (``allow_code_execution`` must be true).
        ids: only these sample ids (MBPP ``task_id`` as strings).
        limit: only the first ``limit`` samples.
        max_new_tokens: generation budget per completion (512 as in the paper).
        timeout: seconds per test program (default: sandbox.timeout).
    """

    class Options(BaseModel):
        """The keyword options of the constructor, as a config's ``options`` gives them."""

        model_config = ConfigDict(frozen=True, extra="forbid")
        ids: list[Any] | None = None
        limit: int | None = None
        max_new_tokens: int = 512
        timeout: float | None = None
        memory_mb: int | None = None

    executes_code: ClassVar[bool] = True

    def __init__(self, name: str = "mbpp", data: str | None = None, sandbox: SandboxConfig | None = None, *,
                 ids: Sequence[Any] | None = None, limit: int | None = None, max_new_tokens: int = 512,
                 timeout: float | None = None, memory_mb: int | None = None):
        self.name = name
        self.sandbox = sandbox or SandboxConfig()
        rows = read_rows(data)
        problems = [_from_row(r) for r in rows]
        self.problems = {p.id: p for p in problems}
        self._ids = select_ids([p.id for p in problems], ids, limit)
        self.max_new_tokens = int(max_new_tokens)
        self.timeout = float(timeout if timeout is not None else self.sandbox.timeout)
        self.memory_mb = int(memory_mb if memory_mb is not None else self.sandbox.memory_mb)

    def sample_ids(self) -> list[str]:
        return list(self._ids)

    def evaluate(self, engine: Engine, ids: Sequence[str] | None = None) -> TaskResult:
        """Generate one completion per problem (one batch), then run all tests in one sandbox batch.

        Raises:
            CodeExecutionNotAllowed: ``sandbox.allow_code_execution`` is false.
        """
        require_code_execution(self.sandbox, self.name)
        start = time.monotonic()
        chosen = select_ids(self._ids, ids, None) if ids is not None else list(self._ids)
        requests = [GenRequest(sample_id=i, turn=0, prompt=chat_prompt(self.problems[i].prompt),
                               max_new_tokens=self.max_new_tokens, stop=STOP) for i in chosen]
        try:
            completions = engine.generate(requests)
        except Exception as e:  # the model failing is every sample failing, not a crash
            err = f"generation failed: {type(e).__name__}: {e}"
            return task_result(self.name, [SampleResult(i, 0.0, err) for i in chosen], start)
        solutions = [sanitize(c) for c in completions]
        programs = [build_test_program(self.problems[i], s) for i, s in zip(chosen, solutions)]
        runs = run_python_batch(programs, timeout=self.timeout, memory_mb=self.memory_mb,
                                backend=self.sandbox.backend) if programs else []
        samples = []
        for i, sol, run in zip(chosen, solutions, runs):
            passed = run.returncode == 0 and not run.timed_out and run.error is None
            error = None
            if not passed:
                tail = (run.stderr.strip().splitlines() or [""])[-1]
                error = run.error or tail or f"exit code {run.returncode}"
            samples.append(SampleResult(i, 1.0 if passed else 0.0, error,
                                        {"solution": sol, "seconds": round(run.seconds, 4)}))
        return task_result(self.name, samples, start)
