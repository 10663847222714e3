"""MBPP / MBPP+ code generation, pass@1 with greedy decoding on the base tests.

Reads either the original MBPP JSONL (``task_id, text, code, test_list,
test_setup_code``) or EvalPlus MBPP+ (``task_id`` like ``"Mbpp/2"``, ``prompt``,
``canonical_solution``, ``entry_point``, and ``base_input`` or ``assertion``), or a Hub
id ``hf://evalplus/mbppplus`` (needs ``datasets`` and a network).

``protocol`` says how a problem is asked and a reply judged:

- ``official`` (the official CycleQD code: fishfarm's EvalPlus task). The prompt is a
  system line and an ``@@ Instruction:`` turn holding the problem text (the MBPP+
  docstring before its ``assert``, or MBPP's ``text``) + " Your code should satisfy the
  following assertion:" + that assertion in a python block, then ``@@ Response:`` with the
  reply opened as a python code block; stops "Instruction:", "Instruction", "Response:",
  "Response". The reply is cut at its first code fence and put through the EvalPlus
  sanitiser of that time (:func:`official_sanitize`), which keeps the entry point only
  where its body holds ``"    return "``. MBPP+ rows with ``base_input`` are judged like
  EvalPlus's base tests: the function runs on every input and must give the canonical
  solution's output (floats within 1e-6), each input within max(0.2 s, 4 x the canonical
  solution's time); other rows run their asserts.
- ``evalplus`` (today's EvalPlus harness): the "Please provide a self-contained Python
  script ..." instruction with the docstring prompt as a chat message, the reply opened
  with EvalPlus's "Below is a Python script ..." and a python block, the AST sanitiser
  :func:`sanitize`, the same base tests.
- ``plain``: the official prompt, the AST sanitiser, and the row's own asserts
  (``test_list`` / ``assertion``): scores the code a reply holds whatever its layout.

The default is ``official`` for MBPP+ data (what the official code scores) and ``plain``
for the original MBPP file, which the official code never scored.
All of a call's test programs run in one sandbox batch.
"""
from __future__ import annotations

import ast
import base64
import json
import pickle
import re
import secrets
import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cycleqd.config import ConfigError, SandboxConfig
from cycleqd.engine.protocol import Engine, GenRequest
from cycleqd.registry import register_task
from cycleqd.sandbox import require_code_execution, run_python_batch
from cycleqd.tasks.dataset import ids_as_strings, read_rows, select_ids, task_result
from cycleqd.tasks.protocol import SampleResult, Task, TaskResult

SYSTEM = ("You are an exceptionally intelligent coding assistant that consistently delivers accurate "
          "and reliable responses to user instructions.")
ASSERTION_INTRO = " Your code should satisfy the following assertion:"
PREFILL = "```python"
STOP = ("Instruction:", "Instruction", "Response:", "Response")
EVALPLUS_INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem "
                        "in a markdown code block:")
EVALPLUS_PREFILL = ("Below is a Python script with a self-contained function that solves the problem and passes "
                    "corresponding tests:\n```python\n")
MIN_TIME_LIMIT = 0.2      # EvalPlus: seconds per base input at least ...
TIME_LIMIT_FACTOR = 4.0   # ... and this many times the canonical solution's time
FLOAT_ATOL = 1e-6         # EvalPlus's tolerance when the expected output is a float
OFFICIAL_COUNT = 399      # problems in EvalPlus MBPP+ v0.1.0, all of which the official code scores

Protocol = Literal["official", "evalplus", "plain"]


class MBPPOptions(BaseModel):
    """Options of the ``mbpp`` task (see :class:`MBPPTask`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: Protocol | None = None
    select: Literal["all", "official"] = "all"
    ids: list[str] | None = None
    limit: int | None = Field(None, ge=0)
    max_new_tokens: int = Field(512, ge=1)
    timeout: float | None = Field(None, gt=0)
    memory_mb: int | None = Field(None, ge=64)

    _ids = field_validator("ids", mode="before")(ids_as_strings)


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


# -- prompts ----------------------------------------------------------------------------------
def official_instruction(text: str, assertion: str) -> str:
    """The official user turn: text ending in a period, the assertion sentence, a python block."""
    text = text.strip()
    if not text.endswith("."):
        text += "."
    return f"{text}{ASSERTION_INTRO}\n```python\n{assertion.strip()}\n```"


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


def official_prompt(problem: Problem) -> str:
    """The full official prompt: system line, ``@@ Instruction:`` turn, ``@@ Response:`` + open python fence."""
    return (f"{SYSTEM}\n\n@@ Instruction:\n{official_instruction(problem.text, problem.assertion)}"
            f"\n\n@@ Response:\n{PREFILL}")


def evalplus_message(problem: Problem) -> str:
    """Today's EvalPlus instruction for a chat model, with the docstring prompt in a code block."""
    return f"{EVALPLUS_INSTRUCTION}\n```\n{problem.docstring.strip()}\n```"


# -- the official sanitiser ---------------------------------------------------------------------
def strip_prefill(reply: str) -> str:
    """The reply without a leading opened python fence.

    A model answering the official prompt continues after the prefilled fence; a recorded
    reply that repeats it (a whole assistant turn) is the same reply.
    """
    head = reply.lstrip()
    if head.startswith(PREFILL):
        return head[len(PREFILL):]
    return reply


def cut_at_fence(reply: str) -> str:
    """The reply up to its first code fence (the official code's end of the prefilled block)."""
    at = reply.find("```")
    return reply if at == -1 else reply[:at]


def _syntax_ok(code: str) -> bool:
    try:
        _parse(code)
        return True
    except (SyntaxError, MemoryError, ValueError):
        return False


def _drop_unindented(code: str, protect: str) -> str:
    """Drop top-level lines after the entry point except defs and imports; stop at the first
    unindented docstring quote, ``if`` or ``print`` (they start example code)."""
    lines = code.splitlines()
    cut: set[int] = set()
    armed = False
    for i, line in enumerate(lines):
        if not armed and line.startswith(protect):
            armed = True
            continue
        if not line.strip() or line.startswith(("def ", "import ", "from ")):
            continue
        if not line[:1].isspace():
            cut.add(i)
        if line.rstrip().startswith(('"""', "if", "print")):
            cut.update(range(i, len(lines)))
            break
    return "\n".join(line for i, line in enumerate(lines) if i not in cut)


def _three_to_four(code: str) -> str:
    """A line indented by exactly three spaces gets a fourth (the one repair the sanitiser makes)."""
    return "".join((" " if len(line) - len(line.lstrip()) == 3 else "") + line + "\n" for line in code.splitlines())


def evalplus_v0_sanitize(code: str, entry_point: str) -> str:
    """EvalPlus's sanitiser as the official code ran it, on the code of one reply.

    Keeps what precedes the first ``def <entry_point>(`` as it is; of the entry point's
    definitions only those whose body holds ``"    return "`` (four spaces: a 2-space or
    tab-indented, one-line or return-less function is dropped); after it, top-level lines
    other than defs and imports go, and an unindented ``if`` / ``print`` / docstring quote
    ends the code; helper functions that do not parse go.
    """
    new = "\n" + code
    head = "def " + entry_point
    new = new.replace("\n```python\n", "\n```\n")
    for chunk in new.split("\n```\n"):
        if head in chunk:
            new = chunk
            break
    chunks = re.split(rf"{re.escape(head)}\s*\(", new)
    bodies = [c for c in chunks[1:] if "    return " in c.split("\ndef")[0]]
    opener = head + "("
    new = opener + opener.join(bodies) if bodies else ""
    new = _three_to_four(new)
    new = _drop_unindented(new, opener)
    new = chunks[0] + new
    parts = new.split("\ndef ")
    kept = [parts[0]] + [fn for fn in parts[1:]
                         if fn.strip().startswith((entry_point + " ", entry_point + "(")) or _syntax_ok("\ndef " + fn)]
    return "\ndef ".join(kept).strip()


def official_sanitize(reply: str, entry_point: str) -> str:
    """The code the official code tests for a reply: cut at the first fence, then :func:`evalplus_v0_sanitize`
    (which needs the entry point; without one the cut code is tested as it is)."""
    code = cut_at_fence(strip_prefill(reply)).strip()
    return evalplus_v0_sanitize(code, entry_point) if entry_point else code


# -- the AST sanitiser (evalplus / plain protocols) --------------------------------------------
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


def _from_row(row: dict) -> Problem:
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


# -- test programs -----------------------------------------------------------------------------
_BASE_TESTS = r'''
import base64 as _b64, copy as _copy, math as _math, os as _os, pickle as _pickle, signal as _signal, sys as _sys
import time as _time

INPUTS = _pickle.loads(_b64.b64decode(PICKLED_INPUTS))

class _Late(BaseException):
    pass

def _alarm(signum, frame):
    raise _Late()

def _floats(x):
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and all(isinstance(v, float) for v in x)
    return isinstance(x, float)

def _flat(x):
    if isinstance(x, (list, tuple)):
        for v in x:
            yield from _flat(v)
    else:
        yield x

def _close(out, exp, atol):
    if isinstance(exp, (list, tuple)) and (not isinstance(out, (list, tuple)) or len(out) != len(exp)):
        return False
    a, b = list(_flat(out)), list(_flat(exp))
    if len(a) != len(b):
        return False
    try:
        return all(abs(x - y) <= atol + 1e-07 * abs(y) for x, y in zip(a, b))
    except TypeError:
        return False

def _same(out, exp, entry, atol):
    exact = out == exp
    if entry == "are_equivalent":
        return True
    if entry == "sum_div":
        return bool(exact or out == 0)
    if entry in ("check_str", "text_match_three", "text_starta_endb"):
        return (exp is not None) == (out is not None)  # only "returned something" is compared
    if atol == 0 and _floats(exp):
        atol = FLOAT_ATOL
    if not exact and atol != 0:
        return _close(out, exp, atol)
    return bool(exact)

_ref = {"__name__": "reference"}
exec(REFERENCE, _ref)
_want, _limits = [], []
for _args in INPUTS:
    _t0 = _time.perf_counter()
    _want.append(_ref[ENTRY](*_copy.deepcopy(_args)))
    _limits.append(max(MIN_TIME, FACTOR * (_time.perf_counter() - _t0)))
_signal.signal(_signal.SIGALRM, _alarm)
_ns = {"__name__": "solution"}
try:
    exec(SOLUTION, _ns)
    _fn = _ns[ENTRY]
    for _i, _args in enumerate(INPUTS):
        _signal.setitimer(_signal.ITIMER_REAL, _limits[_i])
        try:
            _out = _fn(*_copy.deepcopy(_args))
        finally:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
        if not _same(_out, _want[_i], ENTRY, ATOL):
            print(f"AssertionError: base input {_i}: got {_out!r:.200}, expected {_want[_i]!r:.200}", file=_sys.stderr)
            _os._exit(1)
except _Late:
    print(f"timed out on base input {_i} (limit {_limits[_i]:.3f}s)", file=_sys.stderr)
    _os._exit(1)
except BaseException as _e:
    print(f"{type(_e).__name__}: {_e}"[:300], file=_sys.stderr)
    _os._exit(1)
print(PASSED, flush=True)
_os._exit(0)
'''


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


@register_task("mbpp")
class MBPPTask(Task):
    """MBPP(+) pass@1 on the base tests (see module docstring for the protocols).

    Args:
        name: task name in the experiment.
        data: MBPP / MBPP+ JSONL, or ``hf://evalplus/mbppplus``.
        sandbox: the experiment's SandboxConfig (``allow_code_execution`` must be true).
        protocol: ``official`` | ``evalplus`` | ``plain`` (default: official for MBPP+ data,
            plain for the original MBPP file).
        select: ``all``, or ``official``: the same, checked to be MBPP+ v0.1.0's 399 problems.
        ids: only these sample ids (MBPP ``task_id`` as strings).
        limit: only the first ``limit`` samples.
        max_new_tokens: generation budget per completion (512 as in the paper).
        timeout: seconds per test program (default: sandbox.timeout).
        memory_mb: memory per test program (default: sandbox.memory_mb).
    """

    Options: ClassVar[type[BaseModel]] = MBPPOptions
    executes_code: ClassVar[bool] = True

    def __init__(self, name: str = "mbpp", data: str | None = None, sandbox: SandboxConfig | None = None,
                 **options: Any):
        super().__init__(name, data, sandbox, **options)
        opts = self.options
        problems = [_from_row(r) for r in read_rows(data)]
        self.problems = {p.id: p for p in problems}
        self._ids = select_ids([p.id for p in problems], opts.ids, opts.limit)
        plus = bool(problems) and all(p.plus for p in problems)
        if opts.select == "official":
            if not plus or len(problems) != OFFICIAL_COUNT:
                raise ConfigError(f"{data}: select official means all {OFFICIAL_COUNT} problems of EvalPlus MBPP+ "
                                  f"v0.1.0 (MbppPlus-v0.1.0.jsonl); this data has {len(problems)}"
                                  f"{'' if plus else ' MBPP (not MBPP+)'} problems")
        self.protocol: Protocol = opts.protocol or ("official" if plus else "plain")
        self.max_new_tokens = opts.max_new_tokens
        self.timeout = float(opts.timeout if opts.timeout is not None else self.sandbox.timeout)
        self.memory_mb = int(opts.memory_mb if opts.memory_mb is not None else self.sandbox.memory_mb)

    def sample_ids(self) -> list[str]:
        return list(self._ids)

    def request(self, problem: Problem) -> GenRequest:
        """The generation request for one problem under the task's protocol."""
        if self.protocol == "evalplus":
            return GenRequest(sample_id=problem.id, turn=0, max_new_tokens=self.max_new_tokens,
                              messages=({"role": "user", "content": evalplus_message(problem)},),
                              prefill=EVALPLUS_PREFILL)
        return GenRequest(sample_id=problem.id, turn=0, prompt=official_prompt(problem),
                          max_new_tokens=self.max_new_tokens, stop=STOP)

    def solution(self, problem: Problem, reply: str) -> str:
        """The code that is tested for ``reply`` under the task's protocol."""
        if self.protocol == "official":
            return official_sanitize(reply, problem.entry_point)
        # The reply continues an opened python block: give the AST sanitiser the whole block.
        opened = EVALPLUS_PREFILL if self.protocol == "evalplus" else PREFILL + "\n"
        if reply.lstrip().startswith(("```", EVALPLUS_PREFILL.split("\n")[0])):
            opened = ""  # a recorded whole assistant turn opens its own block
        return sanitize(opened + reply)

    def program(self, problem: Problem, solution: str, passed: str) -> str:
        """The test program: EvalPlus base tests where the row has base inputs (not under ``plain``)."""
        if problem.base_inputs is not None and (self.protocol != "plain" or not problem.tests):
            return base_test_program(problem, solution, passed)
        return build_test_program(problem, solution, passed)

    def evaluate(self, engine: Engine, ids: Sequence[str] | None = None) -> TaskResult:
        """Generate one completion per problem (one batch), then run all tests in one sandbox batch.

        Raises:
            CodeExecutionNotAllowed: ``sandbox.allow_code_execution`` is false.
        """
        require_code_execution(self.sandbox, self.name)
        start = time.monotonic()
        chosen = select_ids(self._ids, ids, None) if ids is not None else list(self._ids)
        try:
            completions = engine.generate([self.request(self.problems[i]) for i in chosen])
        except Exception as e:  # the model failing is every sample failing, not a crash
            err = f"generation failed: {type(e).__name__}: {e}"
            return task_result(self.name, [SampleResult(i, 0.0, err) for i in chosen], start)
        # The verdict is a line only the finished test program prints: model code that exits
        # early (sys.exit(0), os._exit(0)) cannot pass.
        passed = "cycleqd-passed-" + secrets.token_hex(8)
        solutions = [self.solution(self.problems[i], c) for i, c in zip(chosen, completions)]
        programs = [self.program(self.problems[i], s, passed) for i, s in zip(chosen, solutions)]
        runs = run_python_batch(programs, timeout=self.timeout, memory_mb=self.memory_mb,
                                backend=self.sandbox.backend) if programs else []
        samples = []
        for i, sol, run, completion in zip(chosen, solutions, runs, completions):
            ok = run.returncode == 0 and run.finished and passed in run.stdout
            error = None
            if not ok:
                tail = (run.stderr.strip().splitlines() or [""])[-1]
                error = run.error or tail or ("empty solution" if not sol.strip() else f"exit code {run.returncode}")
            samples.append(SampleResult(i, 1.0 if ok else 0.0, error,
                                        {"solution": sol, "seconds": round(run.seconds, 4),
                                         "conversation": self.conversation(self.problems[i], completion)}))
        return task_result(self.name, samples, start)

    def conversation(self, problem: Problem, reply: str) -> list[dict[str, str]]:
        """The sample as chat turns (system, user, assistant with the prefilled fence), for trajectories."""
        if self.protocol == "evalplus":
            return [{"role": "user", "content": evalplus_message(problem)},
                    {"role": "assistant", "content": EVALPLUS_PREFILL + reply}]
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": official_instruction(problem.text, problem.assertion)},
                {"role": "assistant", "content": PREFILL + reply}]

    def answer_signatures(self, requests: Sequence[GenRequest], answers: Sequence[str]) -> list[str | None]:
        """What each reply's code prints for the call of the assertion its prompt shows (None if it fails).

        Only the shown assertion's call is run (the model sees it), never the hidden tests or
        their expected values.
        """
        require_code_execution(self.sandbox, self.name)
        problems = [self.problems[r.sample_id] for r in requests]
        programs = [probe_program(self.solution(p, a), p.assertion) for p, a in zip(problems, answers)]
        runs = run_python_batch(programs, timeout=self.timeout, memory_mb=self.memory_mb,
                                backend=self.sandbox.backend) if programs else []
        return [r.stdout if r.returncode == 0 and r.finished and r.stdout else None
                for r in runs]
