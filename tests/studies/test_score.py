"""`cycleqd score`'s library call and the replay engine it uses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cycleqd.config import ConfigError
from cycleqd.engine.answers import ReplayEngine
from cycleqd.engine.protocol import GenRequest
from cycleqd.registry import ENGINES
from cycleqd.studies.score import score, summary

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_replay_engine_returns_recorded_turns(tmp_path) -> None:
    f = _jsonl(tmp_path / "a.jsonl", [{"id": 7, "turns": ["one", "two"]}, {"id": "x", "turns": []}])
    eng = ENGINES.get("replay")(f)
    assert isinstance(eng, ReplayEngine)
    reqs = [GenRequest("7", 0, prompt="p"), GenRequest("7", 1, prompt="p"), GenRequest("7", 2, prompt="p"),
            GenRequest("x", 0, prompt="p"), GenRequest("missing", 0, prompt="p")]
    assert eng.generate(reqs) == ["one", "two", "", "", ""]
    with pytest.raises(TypeError, match="no weights"):
        eng.load_weights({})


@pytest.mark.parametrize("content", ["{not json\n", '{"turns": ["a"]}\n', '{"id": 1, "turns": "a"}\n',
                                     '{"id": 1, "turns": [1]}\n'])
def test_bad_answer_files_are_bad_input(tmp_path, content: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(ConfigError):
        ReplayEngine(f)


def test_score_rejects_bad_input(tmp_path) -> None:
    answers = _jsonl(tmp_path / "a.jsonl", [{"id": 0, "turns": ["x"]}])
    data = _jsonl(tmp_path / "d.jsonl", [{"task_id": 1, "text": "t", "code": "", "test_list": ["assert True"],
                                         "test_setup_code": ""}])
    with pytest.raises(ConfigError, match="unknown task"):
        score("mbqq", str(data), model=None, answers=str(answers), ids=None)
    with pytest.raises(ConfigError, match="not found"):
        score("mbpp", str(tmp_path / "nope.jsonl"), model=None, answers=str(answers), ids=None)
    with pytest.raises(ConfigError, match="not found"):
        score("mbpp", str(data), model=None, answers=str(tmp_path / "nope.jsonl"), ids=None)
    with pytest.raises(ConfigError, match="exactly one"):
        score("mbpp", str(data), model=None, answers=None, ids=None)
    with pytest.raises(ConfigError, match="unknown sample id"):
        score("mbpp", str(data), model=None, answers=str(answers), ids=["5"])
    with pytest.raises(ConfigError):
        score("mbpp", str(data), model=None, answers=str(answers), ids=None, options={"no_such_option": 1})
    (tmp_path / "broken.jsonl").write_text("{oops\n")
    with pytest.raises(ConfigError, match="not valid JSON"):
        score("mbpp", str(tmp_path / "broken.jsonl"), model=None, answers=str(answers), ids=None)


def test_score_replays_and_summarises(tmp_path) -> None:
    rows = [{"task_id": i, "text": f"Return {i}.", "code": f"def f():\n    return {i}",
             "test_list": [f"assert f() == {i}"], "test_setup_code": ""} for i in (1, 2, 3)]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    answers = _jsonl(tmp_path / "a.jsonl", [{"id": 1, "turns": ["```python\ndef f():\n    return 1\n```"]},
                                            {"id": "2", "turns": ["def f():\n    return 0"]}])
    res = score("mbpp", str(data), model=None, answers=str(answers), ids=None)
    assert summary(res) == {"task": "mbpp", "quality": pytest.approx(1 / 3), "n": 3, "failed_ids": ["2", "3"]}
    res = score("mbpp", str(data), model=None, answers=str(answers), ids=[1])
    assert (res.n, res.quality) == (1, 1.0)
    json.dumps(summary(res))


def test_score_a_model_folder(tmp_path, tiny_family) -> None:
    rows = [{"task_id": i, "text": f"Return {i}.", "code": "", "test_list": [f"assert f() == {i}"],
             "test_setup_code": ""} for i in (1, 2)]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    res = score("mbpp", str(data), model=str(tiny_family["base"]), answers=None, ids=None,
                options={"max_new_tokens": 8})
    # A random tiny model writes no working code, but every sample is scored, none crashes.
    assert res.n == 2 and res.quality == 0.0 and len(res.samples) == 2
    with pytest.raises(ConfigError):
        score("mbpp", str(data), model=str(tmp_path / "no_model_here"), answers=None, ids=None)


def test_select_and_protocol_from_the_command_line(tmp_path) -> None:
    """``cycleqd score --select official --protocol ...`` replays the same answers under both protocols."""
    import shutil
    import subprocess
    import sys

    if not (DATA / "agentbench/dbbench/dev.jsonl").is_file():
        pytest.skip("benchmark data folder is absent")
    folder = tmp_path / "data" / "dbbench"
    folder.mkdir(parents=True)
    shutil.copy(DATA / "agentbench/dbbench/dev.jsonl", folder / "dev.jsonl")
    rows = [json.loads(line) for line in (folder / "dev.jsonl").read_text().splitlines()]
    i = next(k for k, r in enumerate(rows) if r["type"][0] == "counting")
    # an Operation reply without an SQL block: officially its final answer still counts
    reply = "Action: Operation\nFinal Answer: " + json.dumps(rows[i]["label"])
    answers = _jsonl(tmp_path / "a.jsonl", [{"id": i, "turns": [reply]}])
    cmd = [sys.executable, "-m", "cycleqd.cli", "score", "dbbench", "--data", str(folder), "--answers", str(answers),
           "--ids", str(i), "--select", "official", "--json"]
    got = {p: json.loads(subprocess.run(cmd + ["--protocol", p], capture_output=True, text=True, check=True).stdout)
           for p in ("official", "agentbench")}
    assert got["official"]["quality"] == 1.0 and got["agentbench"]["quality"] == 0.0
    assert score("dbbench", str(folder), answers=str(answers), ids=[str(i)], select="official").quality == 1.0
    bad = subprocess.run(cmd + ["--protocol", "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "protocol" in bad.stderr
    left_out = next(str(k) for k in range(60) if str(k) not in
                    {str(r["index"]) for r in __import__("cycleqd.tasks.official", fromlist=["x"])
                     .official_samples("dbbench")["rows"] if r["split"] == "dev"})
    with pytest.raises(ConfigError, match="unknown sample id"):  # not in the official selection
        score("dbbench", str(folder), answers=str(answers), ids=[left_out], select="official")
