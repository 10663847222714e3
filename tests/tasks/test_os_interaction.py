"""OS interaction: AgentBench parsing and judging, persistent sessions, and the dev split's examples."""
from __future__ import annotations

import time

import pytest
from answers import write_jsonl
from oracles import OSOracleEngine

from cycleqd.config import ConfigError, SandboxConfig
from cycleqd.engine.answers import ReplayEngine
from cycleqd.sandbox import bwrap_available
from cycleqd.tasks.os_interaction import OSInteractionTask, extract_action, os_feedback

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


# Dev problems whose own check cannot pass a correct answer, with the reason.
BROKEN_DEV = {"8": "check/size-match.py calls int() on du's '4.0K' (int('4.0') raises), so no answer passes"}


def _agentbench_os(tmp_path, shared_data, full: bool = False):
    """An AgentBench-shaped data/os_interaction folder holding dev.json and scripts/dev/ (copies).

    With ``full``, every other problem file of the official list exists too (under today's
    names), each filled with copies of a dev ``match`` problem, so the official positions
    can be checked across all files.
    """
    import json
    import shutil

    root = tmp_path / "AgentBench" / "data" / "os_interaction"
    (root / "data").mkdir(parents=True)
    src = shared_data / "agentbench/os_interaction"
    shutil.copy(src / "dev.json", root / "data" / "dev.json")
    shutil.copytree(src / "scripts" / "dev", root / "scripts" / "dev")
    if full:
        from cycleqd.tasks.official import official_samples

        spec = official_samples("os_interaction")
        dev = json.loads((src / "dev.json").read_text())
        sizes: dict[str, int] = {}
        for p in spec["problems"]:
            name = {"7/2023-06-07-00-13-14.json": "7/bootstrap.json"}.get(p["file"], p["file"])
            sizes[name] = max(sizes.get(name, 0), p["index"] + 2)
        for name, n in sizes.items():
            if name == "dev.json":
                continue
            f = root / "data" / name
            f.parent.mkdir(parents=True, exist_ok=True)
            (root / "scripts" / f.parent.name).mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps([dict(dev[0], description=f"{name} #{k}") for k in range(n)]))
    return root


class TestAgentBenchFolder:
    def test_layout_ids_and_scripts(self, shared_data, tmp_path) -> None:
        root = _agentbench_os(tmp_path, shared_data)
        by_folder = OSInteractionTask(data=str(root))
        one_file = OSInteractionTask(data=str(root / "data" / "dev.json"))
        shared = OSInteractionTask(data=str(shared_data / "agentbench/os_interaction/dev.json"))
        assert len(by_folder.problems) == 26
        assert [p.check for p in by_folder.problems] == [p.check for p in one_file.problems] == \
            [p.check for p in shared.problems]
        assert by_folder.problems[3].extra == {"file": "dev.json", "index": 3}

    def test_official_selection_on_the_dev_problems(self, shared_data, tmp_path) -> None:
        from cycleqd.tasks.official import official_samples

        root = _agentbench_os(tmp_path, shared_data)
        want = [str(p["index"]) for p in official_samples("os_interaction")["problems"] if p["file"] == "dev.json"]
        with pytest.warns(UserWarning, match="not found"):
            task = OSInteractionTask(data=str(root), select="official")
        assert task.sample_ids() == want and sorted(want, key=int) == [str(i) for i in range(26)]
        assert OSInteractionTask(data=str(root / "data" / "dev.json"), select="official").sample_ids() == want

    def test_official_positions_across_all_files(self, shared_data, tmp_path) -> None:
        from cycleqd.tasks.official import official_samples

        root = _agentbench_os(tmp_path, shared_data, full=True)
        task = OSInteractionTask(data=str(root), select="official")
        spec = official_samples("os_interaction")["problems"]
        assert len(task.sample_ids()) == len(spec) == 110
        by_id = {p.id: p for p in task.problems}
        renamed = {"7/2023-06-07-00-13-14.json": "7/bootstrap.json"}
        assert [(by_id[i].extra["file"], by_id[i].extra["index"]) for i in task.sample_ids()] == \
            [(renamed.get(p["file"], p["file"]), p["index"]) for p in spec]
        # numbered folders in number order, dev.json last (the order the official ids count in)
        files = list(dict.fromkeys(p.extra["file"] for p in task.problems))
        assert files[0].startswith("1/") and files[-1] == "dev.json"
        assert [int(f.split("/")[0]) for f in files[:-1]] == sorted(int(f.split("/")[0]) for f in files[:-1])

    def test_bad_folders(self, tmp_path) -> None:
        with pytest.raises(ConfigError, match="data/os_interaction"):
            OSInteractionTask(data=str(tmp_path))
        with pytest.raises(ConfigError, match="select"):
            OSInteractionTask(data=str(tmp_path), select="best")


def test_prompt_wording_per_protocol() -> None:
    """fishfarm's prompt text, pinned; AgentBench's differs in one word."""
    from cycleqd.tasks.os_interaction import OFFICIAL_PROMPT, PROMPT

    fishfarm = (
        "You are an assistant that will act like a person, I'will play the role of linux(ubuntu) operating system. "
        "Your goal is to implement the operations required by me or answer to the question proposed by me. "
        "For each of your turn, you should first think what you should do, and then take exact one of the three "
        'actions: "bash", "finish" or "answer". \n\n'
        "1. If you think you should execute some bash code, take bash action, and you should print like this:\n\n"
        "Think: put your thought here.\n\nAct: bash\n\n```bash\n# put your bash code here\n```\n\n"
        "2. If you think you have finished the task, take finish action, and you should print like this:\n\n"
        "Think: put your thought here.\n\nAct: finish\n\n"
        "3. If you think you have got the answer to the question, take answer action, and you should print like "
        "this:\n\nThink: put your thought here.\n\n"
        "Act: answer(Your answer to the question should be put in this pair of parentheses)\n\n"
        "If the output is too long, I will truncate it. The truncated output is not complete. You have to deal "
        "with the truncating problem by yourself. Attention, your bash code should not contain any input "
        "operation. Once again, you should take only exact one of the three actions in each turn.\n\n")
    assert OFFICIAL_PROMPT == fishfarm
    assert PROMPT == fishfarm.replace("I'will", "I will")


def test_options_are_typed(tmp_path) -> None:

    assert OSInteractionTask.executes_code is True
    data = write_jsonl(tmp_path / "os.jsonl", [{"description": "d", "evaluation": {"match": "ok"}}])
    with pytest.raises(ConfigError, match="did you mean 'max_rounds'"):
        OSInteractionTask(data=str(data), max_round=3)  # the options are declared once, in the Options model
    with pytest.raises(ConfigError, match="protocol"):
        OSInteractionTask(data=str(data), protocol="docker")


@needs_bwrap
def test_unanswered_episodes_are_judged_officially(tmp_path) -> None:
    """fishfarm judges an episode that never answers with "": a check on the machine alone can pass."""
    rows = [{"description": "Create the file /root/done.",
             "evaluation": {"check": [{"code": "test -f /root/done"}]}}]
    data = write_jsonl(tmp_path / "os.jsonl", rows)
    answers = write_jsonl(tmp_path / "a.jsonl", [{"id": 0, "turns": ["Act: bash\n\n```bash\ntouch /root/done\n```",
                                                                     "I am not sure what to do now."]}])
    official = OSInteractionTask(data=str(data), sandbox=ALLOW).evaluate(ReplayEngine(answers))
    agentbench = OSInteractionTask(data=str(data), sandbox=ALLOW, protocol="agentbench").evaluate(ReplayEngine(answers))
    assert official.quality == 1.0 and agentbench.quality == 0.0


@needs_bwrap
def test_official_oracle_on_dev_through_the_folder(shared_data, tmp_path) -> None:
    root = _agentbench_os(tmp_path, shared_data)
    with pytest.warns(UserWarning, match="not found"):  # only dev.json of the official files is here
        task = OSInteractionTask(data=str(root), sandbox=ALLOW, select="official")
    good = task.evaluate(OSOracleEngine(task.problems))
    judged = [s for s in good.samples if s.id not in BROKEN_DEV]
    passed = sum(s.score for s in judged) / len(judged)
    print(f"OS dev, official protocol: good {passed:.4f} of {len(judged)} not broken (failed {good.failed_ids})")
    assert good.n == 26 and passed >= 0.99
    wrong = task.evaluate(OSOracleEngine(task.problems, wrong=True))
    assert wrong.quality <= 0.01
    silent = write_jsonl(tmp_path / "silent.jsonl", [{"id": i, "turns": ["I cannot help."]} for i in task.sample_ids()])
    assert task.evaluate(ReplayEngine(silent)).quality <= 0.01  # judged with "", officially


@needs_bwrap
def test_overlong_prompts_are_counted_and_judged_with_empty_reply(tiny_family, tmp_path) -> None:
    """An engine whose max_model_len is below the OS prompt answers "" (no exception): the episode ends as
    an invalid action, is judged with "" officially, and the sample's detail counts the skipped prompt."""
    from cycleqd.config import EngineConfig
    from cycleqd.engine.hf import HFEngine

    rows = [{"description": "Say anything.", "evaluation": {"match": {"answer": "x"}}},
            {"description": "Say nothing.", "evaluation": {"check": [{"code": "true"}]}}]
    data = write_jsonl(tmp_path / "os.jsonl", rows)
    engine = HFEngine.from_path(str(tiny_family["base"]), EngineConfig(device="cpu", options={"max_model_len": 64}))
    engine.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    res = OSInteractionTask(data=str(data), sandbox=ALLOW).evaluate(engine)
    by_id = {s.id: s for s in res.samples}
    assert [s.detail["overlong_prompts"] for s in res.samples] == [1, 1]
    assert by_id["0"].detail["runs"][0]["status"] == "invalid action" and by_id["0"].score == 0.0
    assert by_id["1"].score == 1.0  # judged with "" as fishfarm judges an unanswered episode
