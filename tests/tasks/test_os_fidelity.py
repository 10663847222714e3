"""The OS machine as AgentBench runs it: a known-correct player passes every dev problem whose
own check is not broken, and near-miss wrong answers never pass."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from answers import write_jsonl
from oracles import OSOracleEngine

from cycleqd.config import SandboxConfig
from cycleqd.engine.answers import ReplayEngine
from cycleqd.engine.protocol import GenRequest
from cycleqd.sandbox import bwrap_available
from cycleqd.tasks.os_interaction import OSInteractionTask

pytestmark = pytest.mark.skipif(not bwrap_available(), reason="bubblewrap (bwrap) missing or cannot start here")
ALLOW = SandboxConfig(allow_code_execution=True)

#: Dev problems whose own check rejects every answer, in AgentBench too (docs/os_environment.md).
BROKEN = {
    "8": 'size-match.py parses du\'s "4.0K" with int("4.0"), which raises: no answer can pass',
}


class NearMissEngine(OSOracleEngine):
    """Plays like the oracle but answers one step off: the number plus one, the text plus a
    character; problems judged by their check alone are finished without doing anything."""

    def _reply(self, r: GenRequest) -> str:
        p = self.problems[r.sample_id]
        if p.match is not None:
            return f"Think: close.\n\nAct: answer({p.match.get('answer', '')}0)"
        if None not in (p.check or ()):
            return "Think: nothing to do.\n\nAct: finish"
        reply = super()._reply(r)
        m = re.search(r"Act: answer\((.*)\)\s*$", reply, re.DOTALL)
        if not m:
            return reply
        right = m.group(1).strip()
        wrong = str(int(right) + 1) if re.fullmatch(r"-?\d+", right) else right + "x"
        return f"Think: close.\n\nAct: answer({wrong})"


@pytest.fixture(scope="module")
def dev_task(shared_data) -> OSInteractionTask:
    return OSInteractionTask(data=str(shared_data / "agentbench/os_interaction/dev.json"), sandbox=ALLOW)


def test_known_correct_player_passes_every_sound_dev_problem(dev_task) -> None:
    res = dev_task.evaluate(OSOracleEngine(dev_task.problems))
    failed = {s.id: s.detail for s in res.samples if s.score < 1.0}
    print(f"OS dev oracle: {res.quality:.4f}, failed {sorted(failed)} (broken: {sorted(BROKEN)})")
    # A command cut at its time limit says the machine was loaded, not that the harness judged
    # wrongly: such problems are played once more, and only a failure without a timeout counts.
    slow = [i for i, d in failed.items() if i not in BROKEN and any(r.get("timeouts") for r in d["runs"])]
    if slow:
        again = dev_task.evaluate(OSOracleEngine(dev_task.problems), ids=slow)
        for s in again.samples:
            if s.score == 1.0:
                failed.pop(s.id)
    assert set(failed) == set(BROKEN), failed


def test_wrong_and_near_miss_answers_never_pass(dev_task) -> None:
    for engine in (OSOracleEngine(dev_task.problems, wrong=True), NearMissEngine(dev_task.problems)):
        res = dev_task.evaluate(engine)
        assert [s.id for s in res.samples if s.score > 0] == []


def test_checks_run_in_a_fresh_shell_not_the_agents(tmp_path) -> None:
    """What the agent does to its own shell cannot change what an example prints in a check."""
    rows = [
        # init appends to ~/.bashrc; the example sources it in a fresh, non-interactive shell,
        # where Ubuntu's .bashrc returns before the appended line (as under docker exec)
        {"description": "What does the example print?",
         "create": {"init": {"code": "echo 'export GREETING=hello' >> ~/.bashrc"}},
         "evaluation": {"check": [None, {"language": "python",
                                         "code": "import sys; sys.exit(sys.argv[1].strip() != sys.argv[2].strip())"}],
                        "example": {"code": "source ~/.bashrc; echo \"[$GREETING]\""}}},
        # the agent's variables, functions and aliases do not reach the example either
        {"description": "Count the files in /root.",
         "create": {"init": {"code": "touch /root/a /root/b"}},
         "evaluation": {"check": [None, {"language": "python",
                                         "code": "import sys; sys.exit(sys.argv[1].strip() != sys.argv[2].strip())"}],
                        "example": {"code": "ls /root | wc -l"}}},
    ]
    data = write_jsonl(tmp_path / "os.jsonl", rows)
    turns0 = ["Act: answer([])"]
    turns1 = ["Act: bash\n\n```bash\nls() { echo 1; echo 2; echo 3; }; alias wc='echo 99 #'; cd /tmp\n```",
              "Act: answer(99)"]
    answers = write_jsonl(tmp_path / "a.jsonl", [{"id": 0, "turns": turns0}, {"id": 1, "turns": turns1}])
    res = OSInteractionTask(data=str(data), sandbox=ALLOW).evaluate(ReplayEngine(answers))
    assert [s.score for s in res.samples] == [1.0, 0.0]
    right = write_jsonl(tmp_path / "b.jsonl", [{"id": 0, "turns": ["Act: answer([hello])"]},
                                                {"id": 1, "turns": turns1[:1] + ["Act: answer(2)"]}])
    res = OSInteractionTask(data=str(data), sandbox=ALLOW).evaluate(ReplayEngine(right))
    assert [s.score for s in res.samples] == [0.0, 1.0]


#: A problem whose scripts install packages or fetch from the web needs the network (none here).
NEEDS_NETWORK = re.compile(r"\b(apt|apt-get)\s+(-\S+\s+)*(update|install)\b|\bpip3?\s+install\b|\bnpm\s+install\b"
                           r"|\b(curl|wget)\s+\S*https?://")


def _needs_network(p) -> bool:
    texts = [c for _, c in p.init] + [s[1] for s in (p.start, p.example, *(p.check or ())) if s]
    return any(NEEDS_NETWORK.search(t) for t in texts)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CYCLEQD_AGENTBENCH"), reason="set CYCLEQD_AGENTBENCH to a THUDM/AgentBench checkout")
def test_agentbench_os_problems_on_the_image() -> None:
    """AgentBench's own OS problems (data/os_interaction/data/1..7, not dev): on the OS image
    the known-correct player passes >= 97% of those that need no network, wrong answers none
    (docs/os_environment.md lists the ones that fail and why)."""
    from cycleqd.sandbox.os_rootfs import image_root

    if image_root("default") is None:
        pytest.skip("OS image not built (make os-image)")
    task = OSInteractionTask(data=str(Path(os.environ["CYCLEQD_AGENTBENCH"]) / "data" / "os_interaction"),
                             sandbox=ALLOW)
    ids = [p.id for p in task.problems if "/" in p.extra["file"] and not _needs_network(p)]
    res = task.evaluate(OSOracleEngine(task.problems), ids=ids)
    by_id = {p.id: p for p in task.problems}
    failed = sorted((by_id[s.id].extra["file"], by_id[s.id].extra["index"]) for s in res.samples if s.score < 1)
    print(f"AgentBench OS on the image: {res.quality:.4f} of {len(ids)}, failed {failed}")
    assert res.quality >= 0.97, failed
    wrong = task.evaluate(OSOracleEngine(task.problems, wrong=True), ids=ids)
    print(f"wrong answers: {wrong.quality:.4f} (passed {[by_id[s.id].extra['file'] for s in wrong.samples if s.score > 0]})")
    assert wrong.quality <= 0.01
