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

import secrets
import time
from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cycleqd.config import ConfigError, SandboxConfig
from cycleqd.engine.protocol import Engine, GenRequest
from cycleqd.registry import register_task
from cycleqd.sandbox import require_code_execution, run_python_batch
from cycleqd.tasks.dataset import ids_as_strings, read_rows, select_ids, task_result
from cycleqd.tasks.mbpp.problems import Problem, problem_from_row
from cycleqd.tasks.mbpp.programs import base_test_program, build_test_program, probe_program
from cycleqd.tasks.mbpp.prompts import (
    EVALPLUS_PREFILL,
    PREFILL,
    STOP,
    SYSTEM,
    evalplus_message,
    official_instruction,
    official_prompt,
)
from cycleqd.tasks.mbpp.sanitize import official_sanitize, sanitize
from cycleqd.tasks.protocol import SampleResult, Task, TaskResult

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
        problems = [problem_from_row(r) for r in read_rows(data)]
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
