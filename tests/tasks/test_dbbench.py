"""DBBench: the AgentBench protocol on SQLite and on a real MariaDB server."""
from __future__ import annotations

import json

import pytest
from answers import dbbench_answers, write_jsonl

from cycleqd.config import ConfigError
from cycleqd.engine.answers import ReplayEngine
from cycleqd.sandbox.databases import SQLiteDatabase, table_hash
from cycleqd.studies.score import score
from cycleqd.tasks.dbbench import DBBenchTask, answer_is_correct, parse_answer
from cycleqd.tasks.official import official_samples


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
    other = dict(row, label=["3"], table=dict(row["table"], table_name="u"))  # its own database
    data = write_jsonl(tmp_path / "d.jsonl", [row, other])
    turns = ["Action: Operation\n```sql\nSELECT COUNT(*) FROM t\n```",
             "Action: Answer\nFinal Answer: [\"2\"]"]
    answers = write_jsonl(tmp_path / "a.jsonl", [{"id": 0, "turns": turns},
                                                 {"id": 1, "turns": [turns[0].replace(" t\n", " u\n"), turns[1]]}])

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
    with pytest.raises(ConfigError, match="mysql://"):
        DBBenchTask(data=data, backend="mysql", url="postgres://x@127.0.0.1/")
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


class TestAnswers:
    """Answers are read like the official ``list(eval(answer))``, without running code."""

    def test_every_label_in_dev_parses_as_eval_reads_it(self, shared_data) -> None:
        rows = [json.loads(line) for line in (shared_data / "agentbench/dbbench/dev.jsonl").read_text().splitlines()]
        for r in rows:
            texts = (" " + json.dumps(r["label"]), " " + repr(r["label"]), json.dumps(r["label"], ensure_ascii=False))
            for text in texts:
                assert parse_answer(text) == list(eval(text)), text  # eval of the data's own labels
            if r["type"][0] not in ("INSERT", "UPDATE", "DELETE"):
                assert answer_is_correct(" " + json.dumps(r["label"]), r["label"])

    def test_eval_semantics_kept(self) -> None:
        assert parse_answer(" [1 + 2, -4.5]") == [3, -4.5]        # arithmetic is evaluated, as by eval
        assert parse_answer(' "ab"') == ["a", "b"]                 # list() of a string: its characters
        assert parse_answer(' {"k": 1}') == ["k"]
        assert parse_answer(" 7") == [" 7"] and answer_is_correct(" 7", ["7.0"])  # list(7) fails: raw text
        assert parse_answer(" (1, 2)") == [1, 2] and parse_answer("1, 2") == [1, 2]

    def test_no_code_runs(self) -> None:
        for text in (" __import__('os').system('touch /tmp/pwned-db')", " [open('/etc/passwd').read()]",
                     " [x for x in range(3)]", " [2 ** 100000]", " ['a'] * 10 ** 9", " [lambda: 1]",
                     " [null]"):
            assert parse_answer(text) == [text]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _agentbench_dbbench(tmp_path, shared_data, with_standard: bool):
    """An AgentBench-shaped data/dbbench folder: dev.jsonl, and a 300-row standard.jsonl made of dev rows."""
    folder = tmp_path / "AgentBench" / "data" / "dbbench"
    folder.mkdir(parents=True)
    dev = _rows(shared_data / "agentbench/dbbench/dev.jsonl")
    write_jsonl(folder / "dev.jsonl", dev)
    if with_standard:
        std = [dict(dev[i % len(dev)]) for i in range(300)]
        std[4] = dict(dev[6], label=["Vienna"])  # a one-value row, labelled as AgentBench's standard:4
        write_jsonl(folder / "standard.jsonl", std)
    return folder, dev


class TestOfficialSelection:
    def test_folder_with_dev_only(self, shared_data, tmp_path) -> None:
        folder, dev = _agentbench_dbbench(tmp_path, shared_data, with_standard=False)
        task = DBBenchTask(data=str(folder), select="official")
        want = [str(r["index"]) for r in official_samples("dbbench")["rows"] if r["split"] == "dev"]
        assert task.sample_ids() == want and len(want) == 54
        assert DBBenchTask(data=str(folder)).sample_ids() == [str(i) for i in range(60)]
        # one file named like AgentBench's selects the same rows
        assert DBBenchTask(data=str(folder / "dev.jsonl"), select="official").sample_ids() == want

    def test_standard_then_dev_as_the_official_ids_count(self, shared_data, tmp_path) -> None:
        folder, dev = _agentbench_dbbench(tmp_path, shared_data, with_standard=True)
        task = DBBenchTask(data=str(folder), select="official")
        official = official_samples("dbbench")["rows"]
        assert len(task.sample_ids()) == len(official) == 341
        assert task.sample_ids() == [str(r["index"] + (300 if r["split"] == "dev" else 0)) for r in official]
        assert task.sources[300] == ("dev", 0) and task.rows[300] == dev[0]
        # the official copy's label of standard:4; AgentBench's own under the agentbench protocol
        assert task.rows[4]["label"] == ["Vienna International Airport"]
        assert DBBenchTask(data=str(folder), protocol="agentbench").rows[4]["label"] == ["Vienna"]

    def test_not_agentbench_data(self, tmp_path) -> None:
        with pytest.raises(ConfigError, match="standard.jsonl"):
            DBBenchTask(data=str(tmp_path), select="official")
        row = {"type": ["counting"], "label": ["1"],
               "table": {"table_name": "t", "table_info": {"columns": [], "rows": []}}}
        with pytest.raises(ConfigError, match="select official"):
            DBBenchTask(data=str(write_jsonl(tmp_path / "mine.jsonl", [row])), select="official")
        with pytest.raises(ConfigError, match="select"):
            DBBenchTask(data=str(tmp_path / "mine.jsonl"), select="some")


def test_official_oracle_on_dev_through_the_folder(shared_data, tmp_path) -> None:
    folder, _ = _agentbench_dbbench(tmp_path, shared_data, with_standard=False)
    good, bad = dbbench_answers(folder / "dev.jsonl", tmp_path)
    res_good, res_bad = _replay(folder, good, bad, select="official", protocol="official")
    print(f"DBBench dev, official selection: good {res_good.quality:.4f} of {res_good.n}, bad {res_bad.quality:.4f}")
    assert res_good.n == 54 and res_good.quality >= 0.99
    assert res_bad.quality <= 0.01


class TestProtocols:
    def _row(self):
        return {"description": "How many?", "add_description": "Table t.", "type": ["counting"], "label": ["2"],
                "table": {"table_name": "t", "table_info": {"columns": [{"name": "a", "type": "TEXT"}],
                                                            "rows": [["1"], ["2"]]}}}

    def test_operation_without_sql_reads_the_final_answer_officially(self, tmp_path) -> None:
        data = write_jsonl(tmp_path / "d.jsonl", [self._row()])
        reply = "I know it.\nAction: Operation\nFinal Answer: [\"2\"]"
        answers = write_jsonl(tmp_path / "a.jsonl", [{"id": 0, "turns": [reply]}])
        assert DBBenchTask(data=str(data)).evaluate(ReplayEngine(answers)).quality == 1.0
        res = DBBenchTask(data=str(data), protocol="agentbench").evaluate(ReplayEngine(answers))
        assert res.quality == 0.0 and "invalid action" in res.samples[0].detail["status"]

    def test_rounds(self, tmp_path) -> None:
        # five operations, then the answer: a sixth reply officially, past AgentBench's five
        data = write_jsonl(tmp_path / "d.jsonl", [self._row()])
        turns = ["Action: Operation\n```sql\nSELECT COUNT(*) FROM t\n```"] * 5
        turns.append("Action: Answer\nFinal Answer: [\"2\"]")
        answers = write_jsonl(tmp_path / "a.jsonl", [{"id": 0, "turns": turns}])
        assert DBBenchTask(data=str(data)).evaluate(ReplayEngine(answers)).quality == 1.0
        res = DBBenchTask(data=str(data), protocol="agentbench").evaluate(ReplayEngine(answers))
        assert res.quality == 0.0 and res.samples[0].detail["status"] == "round limit"

    def test_options_are_typed(self, tmp_path) -> None:

        assert DBBenchTask.executes_code is False
        data = str(write_jsonl(tmp_path / "d.jsonl", [self._row()]))
        with pytest.raises(ConfigError, match="did you mean 'max_rounds'"):
            DBBenchTask(data=data, max_rouns=3)  # the options are declared once, in DBBenchTask.Options
        assert DBBenchTask(data=data, max_round=3).max_rounds == 3  # the old name, as old run folders hold it
        with pytest.raises(ConfigError, match="protocol"):
            DBBenchTask(data=data, protocol="evalplus")
        with pytest.raises(ConfigError, match="max_round"):
            DBBenchTask(data=data, max_round=0)


class TestBoundedParser:
    """The answer parser runs in the worker: no answer text can hang it, grow its memory or raise."""

    CORPUS = (
        " [((10**1000)**1000)**100]", " [10**1000**1000]", " [9**9**9**9]", " [2**4095*2**4095*2**4095]",
        " [(2**4000)**2]", " [" + "*".join(["99999999"] * 2000) + "]", " [1.5**1e9]", " [(1+1j)**(10**300)]",
        " 'a'*10**9", " [0]*10**9", " [[0]*100000]*100000", " [[[[0]*40]*40]*40]*40", " [b'x'*10**9]",
        " [" + "[0]*100000," * 3000 + "]", " " + "+".join(["[0]*99999"] * 30), " [" + ",".join(["2**4000"] * 2000) + "]",
        " {'a' * 50000: 1, 'b' * 50000: 2}", " '%099999999d' % 1", " ['%s' * 99999 % tuple(range(99999))]",
        " " + "[" * 199 + "]" * 199, " " + "-" * 19000 + "1", " " + "not " * 5000 + "1", " " + "(" * 150 + "1" + ")" * 150,
        " [" + ",".join(["1"] * 1999) + "]", " [\"" + "x" * 10**6 + "\"]", " " + "x" * 10**6,
        " [" + ",".join(["2**4000"] * 500) + "]", " [" + ",".join(["'" + "y" * 99 + "'*999"] * 100) + "]",
    )

    def test_huge_deep_and_long_answers_are_wrong_quickly(self) -> None:
        """Each answer of the corpus parses, scores and gives its signature within 0.1 s each (the
        best of three tries, so a busy machine's pause is not counted), scores 0, raises nothing."""
        import time

        from cycleqd.tasks.dbbench import action_signature

        def took(fn) -> float:
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            return best

        for text in self.CORPUS:
            assert isinstance(parse_answer(text), list)
            assert not answer_is_correct(text, ["1"]) and not answer_is_correct(text, ["1", "2"]), text[:60]
            for fn in (lambda: parse_answer(text), lambda: answer_is_correct(text, ["1"]),
                       lambda: action_signature("Action: Answer\nFinal Answer:" + text)):
                assert took(fn) < 0.1, text[:60]

    def test_answer_past_a_limit_is_wrong_even_when_its_text_equals_the_label(self) -> None:
        """A parse past a limit is a wrong answer, not a fall-back to comparing the raw text."""
        text = " [2 ** 100000]"
        assert parse_answer(text) == [text]
        assert not answer_is_correct(text, [text])
        assert answer_is_correct(" [2 ** 4000 // 2 ** 3990]", ["1024"])  # big intermediates within the limit


@pytest.mark.mariadb
def test_mysql_without_url_starts_its_own_server_and_drops_each_database_when_scored(tmp_path) -> None:
    """``backend: mysql`` without ``url`` starts cycleqd's own MariaDB server (once per task object);
    under ``protocol: agentbench`` a sample's database is gone as soon as its episode is scored,
    while other samples still play."""
    import pymysql

    from cycleqd.sandbox.mariadb import mariadb_available

    if not mariadb_available():
        pytest.skip("MariaDB server not installed (apt-get install mariadb-server)")
    row = {"description": "How many?", "add_description": "Table t.", "type": ["counting"], "label": ["2"],
           "table": {"table_name": "t", "table_info": {"columns": [{"name": "a", "type": "TEXT"}],
                                                       "rows": [["1"], ["2"]]}}}
    data = write_jsonl(tmp_path / "d.jsonl", [row, row])
    op = "Action: Operation\n```sql\nSELECT COUNT(*) FROM t\n```"
    answers = write_jsonl(tmp_path / "a.jsonl", [{"id": 0, "turns": ["Action: Answer\nFinal Answer: [\"2\"]"]},
                                                 {"id": 1, "turns": [op, op, "Action: Answer\nFinal Answer: [\"2\"]"]}])
    task = DBBenchTask(data=str(data), backend="mysql", protocol="agentbench")
    try:
        assert task.server is not None and task.url == task.server.url

        def databases() -> set[str]:
            con = pymysql.connect(**task.server.connect, autocommit=True)
            try:
                with con.cursor() as cur:
                    cur.execute("SHOW DATABASES")
                    return {r[0] for r in cur.fetchall()} - {"mysql", "information_schema", "performance_schema", "sys"}
            finally:
                con.close()

        seen: list[tuple[int, int]] = []

        class Spy(ReplayEngine):
            def generate(self, requests):
                seen.append((len(requests), len(databases())))
                return super().generate(requests)

        res = task.evaluate(Spy(answers))
        assert [s.score for s in res.samples] == [1.0, 1.0]
        # round 1: both samples' databases; rounds 2-3: sample 0 answered and its database is dropped
        assert seen == [(2, 2), (1, 1), (1, 1)]
        assert databases() == set()
    finally:
        task.close()
    assert task.server is None
