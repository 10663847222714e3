"""OS interaction: AgentBench parsing and judging, persistent sessions, and the dev split's examples."""
from __future__ import annotations

import time

import pytest

from cycleqd.config import ConfigError, SandboxConfig
from cycleqd.engine.replay import ReplayEngine
from cycleqd.sandbox import bwrap_available
from cycleqd.tasks.os_interaction import OSInteractionTask, extract_action, os_feedback
from oracles import OSOracleEngine
from answers import write_jsonl

needs_bwrap = pytest.mark.skipif(not bwrap_available(), reason="bubblewrap (bwrap) missing or cannot start here")
ALLOW = SandboxConfig(allow_code_execution=True)


def test_action_parsing_follows_agentbench() -> None:
    a = extract_action("Think: list.\n\nAct: bash\n\n```bash\nls /\n```\n```bash\npwd\n```")
    assert a["action"] == "bash" and a["content"] == "ls /\n\npwd"
    assert extract_action("Think: ok\n\nAct: answer(42)")["content"] == "42"
    assert extract_action("Act: finish") == {"thought": "", "action": "commit", "content": None}
    # the last Act line wins; an answer without parentheses is skipped
    assert extract_action("Act: answer(1)\nAct: answer 2")["content"] == "1"
    assert extract_action("I will just talk.")["action"] is None


def test_feedback_truncates_like_agentbench() -> None:
    assert os_feedback("") == "The output of the OS is empty."
    assert os_feedback("x" * 800) == "The output of the OS:\n\n" + "x" * 800
    long = os_feedback("y" * 801)
    assert long == "The output of the OS:\n\n" + "y" * 780 + "\n[truncated because the output is too long]"


@needs_bwrap
def test_state_persists_within_an_episode_and_not_across(tmp_path) -> None:
    rows = [{"description": "Make /root/x and tell me its content.",
             "create": {"local": "default", "init": {"code": "echo seeded > /root/seed"}},
             "evaluation": {"check": [None, {"language": "python", "code": "import sys; sys.exit(sys.argv[1].strip() != sys.argv[2].strip())"}],
                            "example": {"code": "cat /root/x"}}}] * 2
    data = write_jsonl(tmp_path / "os.jsonl", rows)
    turns = ["Act: bash\n\n```bash\ncd /root && X=$(cat seed)-more\nsleep 30 &\n```",
             "Act: bash\n\n```bash\necho $X > x; pwd; cat x\n```",
             "Act: answer(seeded-more)"]
    answers = write_jsonl(tmp_path / "a.jsonl", [{"id": 0, "turns": turns},
                                                  {"id": 1, "turns": ["Act: answer(seeded-more)"]}])
    t = time.monotonic()
    res = OSInteractionTask(data=str(data), sandbox=ALLOW).evaluate(ReplayEngine(answers))
    assert time.monotonic() - t < 20
    # sample 0 built the file over two rounds; sample 1 (fresh machine) never made /root/x
    assert [s.score for s in res.samples] == [1.0, 0.0]


@needs_bwrap
def test_hostile_commands_are_contained(tmp_path) -> None:
    rows = [{"description": "d", "evaluation": {"match": "ok"}}]
    data = write_jsonl(tmp_path / "os.jsonl", rows)
    turns = ["Act: bash\n\n```bash\nsleep 1000\n```",
             "Act: bash\n\n```bash\necho pwned > /work/pwned; cat /etc/shadow | head -1; ls /work | wc -l\n```",
             "Act: answer(ok)"]
    answers = write_jsonl(tmp_path / "a.jsonl", [{"id": 0, "turns": turns}])
    t = time.monotonic()
    res = OSInteractionTask(data=str(data), sandbox=ALLOW, command_timeout=1.0).evaluate(ReplayEngine(answers))
    assert time.monotonic() - t < 15 and res.quality == 1.0
    import os

    assert not os.path.exists("/work/pwned")


def test_needs_the_opt_in_and_good_data(shared_data, tmp_path) -> None:
    data = str(shared_data / "agentbench/os_interaction/dev.json")
    from cycleqd.sandbox import CodeExecutionNotAllowed

    with pytest.raises(CodeExecutionNotAllowed):
        OSInteractionTask(data=data, sandbox=SandboxConfig()).evaluate(OSOracleEngine([]))
    with pytest.raises(ConfigError):
        OSInteractionTask(data=data, scripts=str(tmp_path))  # the check scripts are not there
    with pytest.raises(ConfigError):
        OSInteractionTask(data=data, runs=0)


@needs_bwrap
def test_dev_examples_pass_and_wrong_answers_fail(shared_data) -> None:
    task = OSInteractionTask(data=str(shared_data / "agentbench/os_interaction/dev.json"), sandbox=ALLOW)
    good = task.evaluate(OSOracleEngine(task.problems))
    wrong = task.evaluate(OSOracleEngine(task.problems, wrong=True))
    print(f"OS dev examples: good {good.quality:.4f} (failed {good.failed_ids}), wrong {wrong.quality:.4f}")
    assert good.n == 26 and good.quality >= 0.9
    assert wrong.quality == 0.0


@needs_bwrap
def test_runs_are_averaged(shared_data) -> None:
    task = OSInteractionTask(data=str(shared_data / "agentbench/os_interaction/dev.json"), sandbox=ALLOW,
                             ids=["6", "13"], runs=2)
    res = task.evaluate(OSOracleEngine(task.problems))
    assert res.quality == 1.0 and all(s.detail["scores"] == [1.0, 1.0] for s in res.samples)
