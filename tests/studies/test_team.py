"""Teams of elites: the router sends a request to its niche, the vote groups answers by what they do,
the mixture gives the proposals to its aggregator; `cycleqd team` writes team.json beside the best elite."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cycleqd.config import SandboxConfig
from cycleqd.engine.protocol import GenRequest
from cycleqd.runs.folder import RunFolder
from cycleqd.studies.team import Residents, TeamEngine, choose_team, evaluate_team, vote, with_proposals

SANDBOX = SandboxConfig(allow_code_execution=True, timeout=5, memory_mb=512)


def _cycleqd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "cycleqd.cli", "-q", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def _residents(run: Path, team) -> tuple[Residents, dict]:
    from cycleqd.evolve.worker import ChildWorker

    folder = RunFolder(run)
    worker = ChildWorker(folder.config, threads=torch.get_num_threads())
    genomes = {m.genome: folder.store.load_genome(m.genome) for m in team.members}
    return Residents(worker.engine, worker.factors, genomes), worker.tasks


def test_vote_takes_the_largest_group_then_the_better_member():
    assert vote(["a", "b", "a"], [0.9, 0.95, 0.1]) == 0  # two say "a": the better of them answers
    assert vote(["a", "b", "c"], [0.2, 0.7, 0.5]) == 1  # all alone: the best member
    assert vote(["a", "a", "b", "b"], [0.1, 0.3, 0.9, 0.2]) == 2  # a tie of groups: the one holding 0.9
    assert vote([None, None, "x"], [0.9, 0.8, 0.1]) == 2  # answers that do not run form no group
    assert vote([None, None], [0.3, 0.6]) == 1


def _equivalent_code(answer: str) -> str:
    return answer.replace("return ", "return (lambda v: v)(", 1) + ")"


def test_mini_signatures_are_execution_results_not_texts():
    from cycleqd.tasks.mini_code import MiniCode
    from cycleqd.tasks.mini_shell import MiniShell
    from cycleqd.tasks.mini_sql import MiniSQL

    code = MiniCode("code", sandbox=SANDBOX, split="val", n=5)
    sql = MiniSQL("sql", sandbox=SANDBOX, split="val", n=20)
    shell = MiniShell("shell", sandbox=SANDBOX, split="val", n=5)
    it = code.items[0]
    req = [GenRequest(sample_id=it.id, prompt=it.prompt)] * 4
    sigs = code.answer_signatures(req, [it.answer, _equivalent_code(it.answer), "def f(*a): return 'other'",
                                        "def f(:"])
    assert sigs[0] == sigs[1] and sigs[0] and sigs[2] and sigs[2] != sigs[0] and sigs[3] is None
    assert vote(sigs[:3], [0.1, 0.2, 0.9]) in (0, 1)  # two that act alike outvote a better member

    it = next(i for i in sql.items if "DISTINCT" not in i.answer.upper() and i.answer.startswith("SELECT"))
    req = [GenRequest(sample_id=it.id, prompt=it.prompt)] * 3
    sigs = sql.answer_signatures(req, [it.answer, it.answer.replace("SELECT", "SELECT ALL", 1), "SELEC nothing"])
    assert sigs[0] == sigs[1] is not None and sigs[2] is None

    it = shell.items[0]
    req = [GenRequest(sample_id=it.id, prompt=it.prompt)] * 3
    sigs = shell.answer_signatures(req, [it.answer, it.answer + " | cat", "echo something else"])
    assert sigs[0] == sigs[1] is not None and sigs[2] != sigs[0]


def test_multi_turn_signatures_are_the_proposed_actions():
    from cycleqd.tasks.dbbench import action_signature as db
    from cycleqd.tasks.os_interaction import action_signature as os_sig

    a = "I look.\nAction: Operation\n```sql\nSELECT  name FROM t\nWHERE x = 1;\n```"
    b = "Let me query.\nAction: Operation\n```sql\nSELECT name FROM t WHERE x = 1;\n```"
    assert db(a) == db(b) == "sql SELECT name FROM t WHERE x = 1;"
    assert db("Action: Answer\nFinal Answer: [\"3\"]") == db("ok\nAction: Answer\nFinal Answer: ['3']")
    assert db("no action here") is None
    assert os_sig("Think: a\n\nAct: bash\n\n```bash\nls /etc\n```") == os_sig("Think: b\n\nAct: bash\n\n```bash\nls /etc\n\n```")
    assert os_sig("Think: x\n\nAct: answer(220)") != os_sig("Think: x\n\nAct: answer(221)")
    assert os_sig("Think: nothing") is None


def test_proposals_go_into_the_aggregators_prompt():
    raw = with_proposals(GenRequest(sample_id="1", prompt="py: add 3\n"), ["def f(x): return x+3", "oops"])
    assert raw.prompt == "proposal 1: def f(x): return x+3\nproposal 2: oops\npy: add 3\n"
    chat = with_proposals(GenRequest(sample_id="1", messages=({"role": "user", "content": "Q?"},)), ["A1", "A2"])
    assert chat.messages[-1]["content"].startswith("Q?") and "[1] A1" in chat.messages[-1]["content"]
    assert "[2] A2" in chat.messages[-1]["content"] and len(chat.messages) == 1


def test_team_members_come_from_the_archives_scores(tiny_mini_run):
    snap = RunFolder(tiny_mini_run).snapshot()
    team = choose_team(snap, "vote", size=2)
    for t in snap.tasks:
        ranked = sorted(snap.archives[t]["elites"], key=lambda e: (-e["quality"], e["genome"]))
        assert team.plan[t]["router"] == ranked[0]["genome"]
        assert team.plan[t]["voters"] == [e["genome"] for e in ranked[:2]]
        cells = {tuple(e["cell"]) for e in ranked[:2]}
        assert len(cells) == len(team.plan[t]["voters"])  # distinct cells
    assert {m.genome for m in team.members} == {g for t in snap.tasks for g in team.plan[t]["voters"]}
    with pytest.raises(ValueError, match="strategy"):
        choose_team(snap, "democracy")
    router = choose_team(snap, "router")
    assert all(set(p) == {"router"} for p in router.plan.values())
    assert [m.genome for m in router.members] == router.routers
    from cycleqd.studies.team import Team

    data = team.to_json()
    assert Team.from_json(data) == team
    data["plan"]["code"]["voters"] = ["g999999"]
    with pytest.raises(ValueError, match="unknown one"):
        Team.from_json(data)


@pytest.fixture(scope="module")
def router_run(mini_run):
    team = choose_team(RunFolder(mini_run).snapshot(), "router")
    residents, tasks = _residents(mini_run, team)
    results, engines = evaluate_team(team, residents, tasks)
    return team, residents, tasks, results, engines


def test_the_task_router_sends_each_request_to_its_niche(router_run):
    team, _, tasks, results, engines = router_run
    for name, task in tasks.items():
        trace = engines["router_task"][name].trace
        assert [r["sample_id"] for r in trace] == task.sample_ids()
        assert {r["member"] for r in trace} == {team.plan[name]["router"]}
        # the niche's best elite is a strong model of that task: the router keeps its score
        assert results["router_task"][name].quality == pytest.approx(team.member(team.plan[name]["router"])
                                                                   .scores[name], abs=0.1)


def test_the_nll_router_sends_each_request_to_the_least_surprised_member(router_run):

    team, residents, tasks, _, engines = router_run
    engine = residents.engine
    for name, task in tasks.items():
        reqs = task.requests(task.items)
        want = {}
        for g in team.routers:
            with torch.no_grad():
                engine.load_genome(residents.genomes[g], residents.factors)
            want[g] = [-s / n for s, n in engine.prompt_logprobs(reqs)]
            # a raw prompt is scored as the plain text is (independent of the batching and padding)
            plain = [-s / n for s, n in engine.sequence_logprobs([r.prompt for r in reqs], batch_size=5)]
            assert want[g] == pytest.approx(plain, rel=1e-4)
        residents.current = None  # the engine now holds another model than the residents think
        trace = engines["router_nll"][name].trace
        for i, rec in enumerate(trace):
            assert rec["nll"] == pytest.approx({g: want[g][i] for g in team.routers}, rel=1e-4)
            assert rec["member"] == min(team.routers, key=lambda g: (want[g][i], team.routers.index(g)))


def test_the_vote_groups_answers_by_their_execution_result(mini_run):
    team = choose_team(RunFolder(mini_run).snapshot(), "vote", size=3)
    residents, tasks = _residents(mini_run, team)
    results, engines = evaluate_team(team, residents, tasks)
    disagreements = groups = 0
    for name, task in tasks.items():
        trace = engines["vote"][name].trace
        voters = team.plan[name]["voters"]
        assert len(trace) == len(task.sample_ids())
        for rec in trace:
            req = [r for r in task.requests(task.items) if r.sample_id == rec["sample_id"]]
            again = {g: task.answer_signatures(req, [rec["answers"][g]])[0] for g in voters}
            assert again == rec["signatures"]  # the groups are the task's execution results
            sizes = {}
            for g in voters:
                if again[g] is not None:
                    sizes[again[g]] = sizes.get(again[g], 0) + 1
            if sizes:
                assert len(rec["group"]) == max(sizes.values()) and rec["member"] in rec["group"]
                assert all(again[g] == again[rec["member"]] for g in rec["group"])
            disagreements += len(set(rec["answers"].values())) > 1
            groups += len(rec["group"]) > 1
        # what the team answered is what its winners said, and the task scored exactly that
        outputs = [s.detail["output"] for s in results["vote"][name].samples]
        assert outputs == [rec["answers"][rec["member"]] for rec in trace]
    assert disagreements > 0  # the voters are different models: there was something to vote on
    assert groups > 0  # and answers that act alike were counted together


def test_moa_gives_the_proposals_to_the_aggregator(tiny_mini_run):
    team = choose_team(RunFolder(tiny_mini_run).snapshot(), "moa", size=2)
    residents, tasks = _residents(tiny_mini_run, team)
    results, engines = evaluate_team(team, residents, tasks)
    for name, task in tasks.items():
        trace = engines["moa"][name].trace
        by_id = {it.id: it for it in task.items}
        aggregator = team.plan[name]["voters"][0]
        assert {r["member"] for r in trace} == {aggregator}
        prompts = []
        for rec in trace:
            (proposals,) = rec["proposals"]
            assert list(proposals) == team.plan[name]["voters"]
            for k, p in enumerate(proposals.values(), 1):
                assert f"proposal {k}: {p.strip()}\n" in rec["aggregator_prompt"]
            assert rec["aggregator_prompt"].endswith(by_id[rec["sample_id"]].prompt)
            prompts.append(GenRequest(sample_id=rec["sample_id"], prompt=rec["aggregator_prompt"],
                                      max_new_tokens=task.max_new_tokens, stop=("\n",)))
        # the final answers are the aggregator's own completions of those prompts
        again = residents.generate(aggregator, prompts)
        assert again == [rec["answer"] for rec in trace]
        assert [s.detail["output"] for s in results["moa"][name].samples] == again


def test_team_command_writes_team_json_beside_the_best_elite(tiny_mini_run, tmp_path):
    out = tmp_path / "team"
    res = _cycleqd("team", str(tiny_mini_run), "--strategy", "router", "--out", str(out), "--split", "test",
                   "--n", "4")
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads((out / "team.json").read_text())
    assert rec["strategy"] == "router" and set(rec["scores"]) == {"router_task", "router_nll"}
    assert set(rec["best_single"]["scores"]) == {"code", "sql", "shell", "mean"}
    assert rec["split"] == {"split": "test", "n": 4, "seed": None}
    for m in rec["members"]:
        assert (out / "genomes" / f"{m['genome']}.safetensors").is_file() and m["cells"]
    assert rec["cost"]["switches"] >= 1 and rec["cost"]["seconds_per_switch"] > 0
    assert sum(rec["routing"]["router_task"]["code"].values()) == 4
    assert "best elite" in res.stdout


@pytest.mark.parametrize("args,message", [
    (["--strategy", "democracy"], "invalid choice"),
    (["--strategy", "vote", "--size", "0"], "--size"),
    (["--strategy", "vote", "--split", "test", "--n", "0"], "--n"),
])
def test_team_bad_input_is_one_line_and_exit_2(tiny_mini_run, tmp_path, args, message):
    res = _cycleqd("team", str(tiny_mini_run), "--out", str(tmp_path / "t"), *args)
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_team_refuses_a_folder_that_is_not_empty(tiny_mini_run, tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x").write_text("x")
    res = _cycleqd("team", str(tiny_mini_run), "--strategy", "vote", "--out", str(tmp_path / "t"))
    assert res.returncode == 2 and "not an empty folder" in res.stderr


def test_a_multi_turn_vote_is_taken_per_turn_on_the_proposed_action(tmp_path):
    """DBBench on SQLite, three members replaying recorded replies: the best member alone answers at
    once and wrongly; the two others propose the same statement (worded apart), then the right answer."""
    from cycleqd.engine.answers import ReplayEngine
    from cycleqd.studies.team import Member, Team
    from cycleqd.tasks.dbbench import DBBenchTask

    row = {"description": "How many rows have a = 1?", "add_description": "The table is t.",
           "table": {"table_name": "t", "table_info": {"columns": [{"name": "a"}, {"name": "b"}],
                                                       "rows": [["1", "x"], ["1", "y"], ["2", "z"]]}},
           "label": ["2"], "type": ["SELECT"]}
    data = tmp_path / "db.jsonl"
    data.write_text(json.dumps(row) + "\n")
    replies = {
        "m1": ["Action: Operation\n```sql\nSELECT COUNT(*) FROM t WHERE a = '1';\n```",
               "Action: Answer\nFinal Answer: [\"2\"]"],
        "m2": ["I will count them.\nAction: Operation\n```sql\nSELECT COUNT(*)  FROM t\nWHERE a = '1';\n```",
               "It is 2.\nAction: Answer\nFinal Answer: ['2']"],
        "m3": ["Action: Answer\nFinal Answer: [\"5\"]"],
    }
    engines = {}
    for g, turns in replies.items():
        (tmp_path / f"{g}.jsonl").write_text(json.dumps({"id": "0", "turns": turns}) + "\n")
        engines[g] = ReplayEngine(tmp_path / f"{g}.jsonl")
    quality = {"m1": 0.3, "m2": 0.4, "m3": 0.9}
    team = Team("vote", 3, 1, ("db",), tuple(Member(g, {}, {"db": q}) for g, q in quality.items()),
                {"db": {"router": "m3", "voters": ["m3", "m1", "m2"]}})
    task = DBBenchTask("db", str(data))
    assert task.evaluate(engines["m3"]).quality == 0.0  # the best member alone is wrong
    engine = TeamEngine(Residents(None, None, {}, engines), team, "db", "vote", task)
    assert task.evaluate(engine).quality == 1.0
    turns = [(r["turn"], r["member"], sorted(r["group"])) for r in engine.trace]
    assert turns == [(0, "m2", ["m1", "m2"]), (1, "m2", ["m1", "m2"])]  # per turn, the better of the group
    assert engine.trace[1]["signatures"]["m3"] is None  # no reply recorded for turn 2: no action


def test_mbpp_signatures_run_only_the_shown_assertions_call(tmp_path):
    from cycleqd.tasks.mbpp import MBPPTask, probe_call

    assert probe_call("assert f(1, [2]) == 3") == "f(1, [2])"
    assert probe_call("assert math.isclose(area(2), 12.56, rel_tol=0.01)") == "area(2)"
    assert probe_call("not python(") is None
    row = {"task_id": 1, "text": "Add one.", "code": "def f(x):\n    return x + 1",
           "test_list": ["assert f(1) == 2", "assert f(5) == 6"]}
    data = tmp_path / "m.jsonl"
    data.write_text(json.dumps(row) + "\n")
    task = MBPPTask(data=str(data), protocol="plain", sandbox=SANDBOX)
    req = [task.request(task.problems["1"])] * 4
    replies = ["\ndef f(x):\n    return x + 1\n```", "\ndef f(x):\n    return 1 + x\n```",
               # right on the shown call, wrong on the hidden test: the signature cannot tell (no leak)
               "\ndef f(x):\n    return 2 if x == 1 else 0\n```", "\ndef f(x):\n    return x\n```"]
    sigs = task.answer_signatures(req, replies)
    assert sigs[0] == sigs[1] == sigs[2] == "2\n" and sigs[3] == "1\n"
