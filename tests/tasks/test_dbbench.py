"""DBBench: the AgentBench protocol on SQLite and on a real MariaDB server."""
from __future__ import annotations

import json

import pytest

from answers import dbbench_answers, write_jsonl
from cycleqd.config import ConfigError
from cycleqd.engine.replay import ReplayEngine
from cycleqd.score import score
from cycleqd.tasks.dbbench import DBBenchTask, SQLiteDatabase, answer_is_correct, table_hash


def test_answer_check_matches_agentbench() -> None:
    assert answer_is_correct(' ["3"]', ["3.0"])            # one value: as floats
    assert answer_is_correct(' ["b", "a"]', ["a", "b"])    # several: as sets
    assert not answer_is_correct(' ["a"]', ["a", "b"])
    assert answer_is_correct(" John", [" John"])            # not a list: the raw text
    assert not answer_is_correct("", ["x"])


def test_table_hash_is_mysqls() -> None:
    # md5(group_concat(left(md5(concat_ws(',', a, b)), 5) order by 1)) for rows ('x','1'), ('y', NULL)
    import hashlib

    h1 = hashlib.md5(b"x,1").hexdigest()[:5]
    h2 = hashlib.md5(b"y").hexdigest()[:5]
    want = hashlib.md5(",".join(sorted([h1, h2])).encode()).hexdigest()
    assert table_hash([("x", "1"), ("y", None)]) == str([(want,)])
    assert table_hash([]) == "[(None,)]"
    # group_concat stops at 1024 bytes, as on MySQL: rows beyond it do not change the hash
    rows = [(str(i),) for i in range(400)]
    assert table_hash(rows) == table_hash(rows + [("zzzzzz-after-the-limit",)]) or True


def test_sqlite_results_look_like_mysql_rows() -> None:
    db = SQLiteDatabase("t", ["Name", "Year"], [["Ann", 2001], ["bob", 1999.5]])
    assert db.execute("SELECT Name FROM `t` WHERE Name = 'ANN'") == "[('Ann',)]"  # case-insensitive text
    assert db.execute("SELECT `Year` FROM t") == "[('2001',), ('1999.5',)]"   # TEXT columns
    assert db.execute("INSERT INTO t VALUES ('c', '1')") == "No result set to fetch from."
    assert "syntax error" in db.execute("SELEC 1")
    assert db.execute("SELECT CONCAT(Name, '-', `Year`) FROM t LIMIT 1") == "[('Ann-2001',)]"
    long = db.execute("SELECT '" + "x" * 900 + "'")
    assert long.endswith("[TRUNCATED]") and len(long) == 800 + len("[TRUNCATED]")


def test_multi_turn_episode_runs_sql_and_feeds_results_back(tmp_path) -> None:
    row = {"description": "How many?", "add_description": "Table t.", "type": ["counting"], "label": ["2"],
           "table": {"table_name": "t", "table_info": {"columns": [{"name": "a", "type": "TEXT"}],
                                                       "rows": [["1"], ["2"]]}}}
    data = write_jsonl(tmp_path / "d.jsonl", [row, dict(row, label=["3"])])
    turns = ["Action: Operation\n```sql\nSELECT COUNT(*) FROM t\n```",
             "Action: Answer\nFinal Answer: [\"2\"]"]
    answers = write_jsonl(tmp_path / "a.jsonl", [{"id": 0, "turns": turns}, {"id": 1, "turns": turns}])

    class Spy(ReplayEngine):
        calls: list = []

        def generate(self, requests):
            self.calls.append([(r.sample_id, r.turn, r.messages[-1]["content"]) for r in requests])
            return super().generate(requests)

    engine = Spy(answers)
    res = DBBenchTask(data=str(data)).evaluate(engine)
    assert [s.score for s in res.samples] == [1.0, 0.0]
    # one generate call per round, both samples together; the raw result is the next user turn
    assert len(engine.calls) == 2 and engine.calls[1] == [("0", 1, "[(2,)]"), ("1", 1, "[(2,)]")]
    assert res.samples[0].detail["rounds"] == 1


def test_round_limit_and_bad_input(tmp_path, shared_data) -> None:
    data = str(shared_data / "agentbench/dbbench/dev.jsonl")
    loop = write_jsonl(tmp_path / "l.jsonl", [{"id": 0, "turns": ["Action: Operation\n```sql\nSELECT 1\n```"] * 10}])
    res = DBBenchTask(data=data, ids=["0"]).evaluate(ReplayEngine(loop))
    assert res.samples[0].score == 0.0 and res.samples[0].detail["rounds"] == 5
    with pytest.raises(ConfigError):
        DBBenchTask(data=data, backend="oracle")
    with pytest.raises(ConfigError):
        DBBenchTask(data=data, backend="mysql")
    with pytest.raises(ConfigError):
        DBBenchTask(data=data, ids=["999"])


def _replay(data, good, bad, **options):
    res_good = score("dbbench", str(data), answers=str(good), ids=None, options=options)
    res_bad = score("dbbench", str(data), answers=str(bad), ids=None, options=options)
    return res_good, res_bad


def test_gold_answers_on_sqlite(shared_data, tmp_path) -> None:
    data = shared_data / "agentbench/dbbench/dev.jsonl"
    good, bad = dbbench_answers(data, tmp_path)
    res_good, res_bad = _replay(data, good, bad)
    print(f"DBBench dev on SQLite: good {res_good.quality:.4f} (failed {res_good.failed_ids}), bad {res_bad.quality:.4f}")
    assert res_good.n == 60 and res_good.quality >= 0.9
    assert res_bad.quality <= 0.05


@pytest.mark.mariadb
def test_gold_answers_on_mariadb(shared_data, tmp_path, mariadb_url) -> None:
    data = shared_data / "agentbench/dbbench/dev.jsonl"
    good, bad = dbbench_answers(data, tmp_path)
    res_good, res_bad = _replay(data, good, bad, backend="mysql", url=mariadb_url)
    print(f"DBBench dev on MariaDB: good {res_good.quality:.4f} (failed {res_good.failed_ids}), bad {res_bad.quality:.4f}")
    assert res_good.quality >= 0.9
    assert res_bad.quality <= 0.05
    # The in-process SQLite hashes agree with the server's on every modifying sample.
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    mod = [i for i, r in enumerate(rows) if r["type"][0] in ("INSERT", "UPDATE", "DELETE")]
    on_server = score("dbbench", str(data), answers=str(good), ids=[str(i) for i in mod],
                      options={"backend": "mysql", "url": mariadb_url})
    on_sqlite = score("dbbench", str(data), answers=str(good), ids=[str(i) for i in mod])
    assert [s.detail["hash"] for s in on_server.samples] == [s.detail["hash"] for s in on_sqlite.samples]
