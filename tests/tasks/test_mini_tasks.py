"""The mini tasks through their real checkers: gold answers solve, wrong answers fail."""
from __future__ import annotations

import pytest
from run_helpers import ScriptedEngine

from cycleqd.config import SandboxConfig
from cycleqd.registry import TASKS
from cycleqd.sandbox import CodeExecutionNotAllowed

KINDS = ["mini_code", "mini_sql", "mini_shell"]
ALLOW = SandboxConfig(allow_code_execution=True)




def _task(kind, n=40, split="test", sandbox=ALLOW):
    return TASKS.get(kind)(name=kind.removeprefix("mini_"), data=None, sandbox=sandbox, split=split, n=n, seed=0)


@pytest.mark.parametrize("kind", KINDS)
def test_gold_answers_score_one(kind):
    task = _task(kind)
    engine = ScriptedEngine(task, lambda it: it.answer)
    res = task.evaluate(engine)
    assert res.quality == 1.0 and res.n == 40 and res.failed_ids == []
    assert all(r.prompt is not None and r.stop == ("\n",) for r in engine.requests)


WRONG = {
    "mini_code": lambda it: "def f(*args): return object()",
    "mini_sql": lambda it: f"SELECT 12345 FROM {it.context['table']};",
    "mini_shell": lambda it: "echo nothing-like-it",
}


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_answers_score_zero(kind):
    task = _task(kind, n=20)
    res = task.evaluate(ScriptedEngine(task, WRONG[kind]))
    assert res.quality == 0.0 and len(res.failed_ids) == 20


@pytest.mark.parametrize("kind", KINDS)
def test_broken_answers_are_failed_samples_not_errors(kind):
    task = _task(kind, n=6)
    res = task.evaluate(ScriptedEngine(task, lambda it: "((( not valid in any language"))
    assert res.quality == 0.0
    assert all(s.error for s in res.samples if kind != "mini_shell") or kind == "mini_shell"


def test_subset_of_ids():
    task = _task("mini_sql", n=10)
    res = task.evaluate(ScriptedEngine(task, lambda it: it.answer), ids=["3", "7"])
    assert [s.id for s in res.samples] == ["3", "7"] and res.quality == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_skip_gives_a_disjoint_second_sample(kind):
    make = TASKS.get(kind)
    first = make(name="t", split="val", n=30, seed=0)
    second = make(name="t", split="val", n=50, seed=0, skip=30)
    both = make(name="t", split="val", n=80, seed=0)
    assert not {it.prompt for it in first.items} & {it.prompt for it in second.items}
    assert [it.prompt for it in second.items] == [it.prompt for it in both.items[30:]]
    assert len({it.id for it in second.items}) == 50


def test_partial_credit_is_the_mean():
    task = _task("mini_sql", n=10)
    res = task.evaluate(ScriptedEngine(task, lambda it: it.answer if int(it.id) % 2 else "nope"))
    assert res.quality == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["mini_code", "mini_shell"])
def test_code_execution_needs_opt_in(kind):
    task = _task(kind, n=3, sandbox=SandboxConfig(allow_code_execution=False))
    with pytest.raises(CodeExecutionNotAllowed):
        task.evaluate(ScriptedEngine(task, lambda it: it.answer))


def test_endless_sql_is_stopped():
    task = _task("mini_sql", n=2)
    loop = "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM r) SELECT COUNT(*) FROM r;"
    res = task.evaluate(ScriptedEngine(task, lambda it: loop))
    assert res.quality == 0.0 and all("interrupt" in (s.error or "").lower() for s in res.samples)


EQUIVALENT = {  # right answers written differently from the gold line: these must really run
    "mini_code": lambda it: it.answer.replace("return ", "return  ", 1),
    "mini_shell": lambda it: it.answer + " | cat",
}


@pytest.mark.parametrize("kind", ["mini_code", "mini_shell"])
def test_gold_runs_are_reused_with_the_same_verdicts(kind, monkeypatch):
    """Answers equal to the gold line, or checked cleanly before for the item, reuse that run; verdicts are a fresh run's.

    mini_code judges the gold line without a run (its results are computed outside the
    sandbox); mini_shell runs each gold command once, and the gold answer is that run."""
    import cycleqd.tasks.mini_code as code_mod
    import cycleqd.tasks.mini_shell as shell_mod

    mod, fn = (code_mod, "evaluate_calls_batch") if kind == "mini_code" else (shell_mod, "run_shell_batch")
    real, sent = getattr(mod, fn), []
    monkeypatch.setattr(mod, fn, lambda jobs, **kw: sent.append(len(jobs)) or real(jobs, **kw))

    def mix(shift):
        pick = (lambda it: it.answer, EQUIVALENT[kind], WRONG[kind])
        return lambda it: pick[(int(it.id) + shift) % 3](it)

    warm = _task(kind, n=12)
    warm.evaluate(ScriptedEngine(warm, mix(0)))
    assert sent == ([8] if kind == "mini_code" else [8 + 12])  # every other answer, and every gold line once
    again = warm.evaluate(ScriptedEngine(warm, mix(1)))
    assert sent[1] == 8  # the 4 gold answers reuse the gold runs
    fresh = _task(kind, n=12)
    first = fresh.evaluate(ScriptedEngine(fresh, mix(1)))
    assert [s.score for s in again.samples] == [s.score for s in first.samples]
    assert again.quality == pytest.approx(8 / 12)
    third = warm.evaluate(ScriptedEngine(warm, mix(1)))  # the same answers as the second time
    assert sent[3] == 0 and [s.score for s in third.samples] == [s.score for s in first.samples]
    fourth = warm.evaluate(ScriptedEngine(warm, mix(0)))  # the first time's answers, two evaluations back
    assert sent[4] == 0 and fourth.quality == pytest.approx(8 / 12)


@pytest.mark.parametrize("kind", KINDS)
def test_answer_now_check_later_is_evaluate(kind):
    """``answer`` asks the engine at once and checks when called; the verdicts are ``evaluate``'s."""
    task = _task(kind, n=12)
    engine = ScriptedEngine(task, lambda it: it.answer if int(it.id) % 2 else WRONG[kind](it))
    check = task.answer(engine)
    assert len(engine.requests) == 12  # generation happened before the check is called
    res = check()
    again = task.evaluate(engine)
    assert [s.score for s in res.samples] == [s.score for s in again.samples]
    assert res.quality == again.quality == pytest.approx(0.5) and res.seconds > 0
