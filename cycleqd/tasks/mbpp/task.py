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
  python fence appended directly (no newline between); stops "Instruction:", "Instruction", "Response:",
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
Verdicts come from :mod:`cycleqd.sandbox.verdict`: the solution's process gives values
(the asserts' calls, or the entry point's outputs on the base inputs) and this process
judges them, so nothing the solution does (exiting early, forging output, patching the
checks, returning objects that equal everything) can pass a test it did not solve. The
expected outputs of base inputs are the reference solution's, computed once per problem
in its own sandbox job and kept by the task. All of a call's solutions run in one sandbox
batch per kind of test (and the references it still needs in one more).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, Field

from cycleqd.config import ConfigError, SandboxConfig
from cycleqd.engine.protocol import Engine, GenRequest
from cycleqd.registry import register_task
from cycleqd.sandbox import require_code_execution, run_python_batch
from cycleqd.sandbox.verdict import check_asserts_batch, evaluate_calls_batch
from cycleqd.tasks.dataset import DatasetOptions, DatasetTask, read_rows, select_ids
from cycleqd.tasks.mbpp.problems import Problem, problem_from_row
from cycleqd.tasks.mbpp.programs import assert_job, base_calls_job, probe_program, same_output, time_limits
from cycleqd.tasks.mbpp.prompts import (
    EVALPLUS_PREFILL,
    PREFILL,
    STOP,
    SYSTEM,
    evalplus_message,
    official_instruction,
    official_prompt,
)
from cycleqd.tasks.mbpp.sanitizers import official_sanitize, sanitize
from cycleqd.tasks.protocol import SampleResult

OFFICIAL_COUNT = 399      # problems in EvalPlus MBPP+ v0.1.0, all of which the official code scores

Protocol = Literal["official", "evalplus", "plain"]



class MBPPOptions(DatasetOptions):
    """Options of the ``mbpp`` task (see :class:`MBPPTask`)."""

    protocol: Protocol | None = None
    timeout: float | None = Field(None, gt=0, le=3600)
    memory_mb: int | None = Field(None, ge=64, le=1 << 20)


@register_task("mbpp")
class MBPPTask(DatasetTask):
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
        # problem id -> (the reference's outputs on the base inputs, the time limit of each input)
        self._reference: dict[str, tuple[list, list[float]]] = {}

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

    def uses_base_inputs(self, problem: Problem) -> bool:
        """Whether ``problem`` is judged on EvalPlus base inputs (not under ``plain`` where it has asserts)."""
        return problem.base_inputs is not None and (self.protocol != "plain" or not problem.tests)

    def _expected(self, problems: Sequence[Problem]) -> dict[str, str]:
        """Compute and keep the reference outputs of ``problems`` not known yet (one sandbox launch).

        A reference result is kept only when every call gave a value; the problems whose
        reference failed are returned with the reason (their samples fail, and the reference
        runs again next time: a timeout may be the machine's load).
        """
        todo = list({p.id: p for p in problems if p.id not in self._reference}.values())
        jobs = [base_calls_job(p, p.reference) for p in todo]
        failed: dict[str, str] = {}
        for p, res in zip(todo, evaluate_calls_batch(jobs, timeout=self.timeout, memory_mb=self.memory_mb,
                                                     backend=self.sandbox.backend)):
            bad = res.error or next((f"base input {k}: {o.error}" for k, o in enumerate(res.outcomes or ())
                                     if not o.ok), None)
            if bad:
                failed[p.id] = f"the reference solution failed: {bad}"
            else:
                outcomes = res.outcomes or []
                self._reference[p.id] = ([o.value for o in outcomes], time_limits([o.seconds for o in outcomes]))
        return failed

    def _judge_base(self, problems: Sequence[Problem], solutions: Sequence[str]) -> list[tuple[bool, str | None]]:
        failed = self._expected(problems)
        ready = [k for k, p in enumerate(problems) if p.id not in failed]
        jobs = [base_calls_job(problems[k], solutions[k], self._reference[problems[k].id][1]) for k in ready]
        results = evaluate_calls_batch(jobs, timeout=self.timeout, memory_mb=self.memory_mb,
                                       backend=self.sandbox.backend)
        out: list[tuple[bool, str | None]] = [(False, failed.get(p.id)) for p in problems]
        for k, res in zip(ready, results):
            p = problems[k]
            want, limits = self._reference[p.id]
            if res.outcomes is None:
                out[k] = (False, res.error)
                continue
            out[k] = (True, None)
            for i, (o, exp, limit) in enumerate(zip(res.outcomes, want, limits)):
                if not o.ok or o.seconds > limit:
                    late = o.error == "raised TimeoutError" or o.seconds > limit
                    out[k] = (False, f"timed out on base input {i} (limit {limit:.3f}s)" if late
                              else f"base input {i}: {o.error}")
                    break
                if not same_output(o.value, exp, p.entry_point, p.atol):
                    out[k] = (False, f"base input {i}: got {o.value!r:.200}, expected {exp!r:.200}")
                    break
        return out

    def _judge_asserts(self, problems: Sequence[Problem], solutions: Sequence[str]) -> list[tuple[bool, str | None]]:
        out: list[tuple[bool, str | None]] = [(False, None)] * len(problems)
        jobs, where = [], []
        for k, (p, sol) in enumerate(zip(problems, solutions)):
            try:
                jobs.append(assert_job(p, sol))
                where.append(k)
            except ValueError as e:  # the row's tests are not asserts: that sample cannot pass
                out[k] = (False, f"bad test data: {e}")
        verdicts = check_asserts_batch(jobs, timeout=self.timeout, memory_mb=self.memory_mb,
                                       backend=self.sandbox.backend) if jobs else []
        for k, vs in zip(where, verdicts):
            bad = next((v for v in vs if not v.passed), None)
            if bad is None:
                out[k] = (bool(vs), None if vs else "no asserts")
            elif bad.error == "assertion failed":
                out[k] = (False, f"AssertionError: {bad.assertion[:200]}")
            else:
                out[k] = (False, bad.error)
        return out

    def judge(self, problems: Sequence[Problem], solutions: Sequence[str]) -> list[tuple[bool, str | None]]:
        """``(passed, error)`` of each solution on its problem (see the module docstring).

        Raises:
            SandboxUnavailable, UnsafeBackend: the sandbox backend cannot be used.
        """
        base = [k for k, p in enumerate(problems) if self.uses_base_inputs(p)]
        plain = [k for k, p in enumerate(problems) if not self.uses_base_inputs(p)]
        out: list[tuple[bool, str | None]] = [(False, None)] * len(problems)
        for chosen, fn in ((base, self._judge_base), (plain, self._judge_asserts)):
            if chosen:
                for k, verdict in zip(chosen, fn([problems[k] for k in chosen], [solutions[k] for k in chosen])):
                    out[k] = verdict
        return out

    def score(self, engine: Engine, chosen: list[str]) -> list[SampleResult]:
        """Generate one completion per problem (one batch), then judge all solutions (see :meth:`judge`)."""
        try:
            completions = engine.generate([self.request(self.problems[i]) for i in chosen])
        except Exception as e:  # the model failing is every sample failing, not a crash
            err = f"generation failed: {type(e).__name__}: {e}"
            return [SampleResult(i, 0.0, err) for i in chosen]
        problems = [self.problems[i] for i in chosen]
        solutions = [self.solution(p, c) for p, c in zip(problems, completions)]
        verdicts = self.judge(problems, solutions)
        samples = []
        for p, sol, (ok, error), completion in zip(problems, solutions, verdicts, completions):
            if not ok and not sol.strip():
                error = "empty solution"
            samples.append(SampleResult(p.id, 1.0 if ok else 0.0, None if ok else (error or "failed"),
                                        {"solution": sol, "conversation": self.conversation(p, completion)}))
        return samples

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
