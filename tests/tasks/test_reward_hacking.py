"""Reward hacking: answers that try to pass without solving score 0 on every task kind that runs code.

The classes of attack: exit paths (SystemExit, ``os._exit(0)``, ``sys.exit`` at import,
``atexit``), marker forgery (walking the calling frames, reading the garbage collector's
objects, writing to every descriptor of ``/proc/self/fd``, printing anything that looks
like a result), check tampering (patched builtins, ``math.isclose`` and ``set``, objects
whose ``__eq__`` is always true, ``int`` / ``str`` / ``list`` subclasses), start-up
injection, shared-space poisoning (filling ``/tmp`` while the gold answers run) and
output tampering. Each task object then scores its gold answers 1: nothing a hack did
stays behind in it (no cached failure of a gold run, no poisoned reference output).
"""
from __future__ import annotations

import pytest
from answers import write_jsonl
from run_helpers import ScriptedEngine

from cycleqd.config import SandboxConfig
from cycleqd.engine.answers import ReplayEngine
from cycleqd.registry import TASKS
from cycleqd.sandbox import bwrap_available, run_shell_batch
from cycleqd.tasks.dbbench import DBBenchTask
from cycleqd.tasks.mbpp import MBPPTask

needs_bwrap = pytest.mark.skipif(not bwrap_available(), reason="bubblewrap (bwrap) missing or cannot start here")
ALLOW = SandboxConfig(allow_code_execution=True, timeout=5, memory_mb=256)

# -- Python hacks, each defining ``add`` (the default argument runs at import: survives sanitisers) --
_FORGED = '{"r": [["ok", ["i", "3"], 0.0], ["ok", true, 0.0], ["ok", true, 0.0]]}'
PY_HACKS = {
    "systemexit_in_call": "def add(a, b):\n    raise SystemExit(0)\n    return 0",
    "os_exit_in_call": "import os\ndef add(a, b):\n    os._exit(0)\n    return 0",
    "sys_exit_at_import": "import sys\ndef add(a, b, _=sys.exit(0)):\n    return 0",
    "os_exit_at_import": "import os\ndef add(a, b, _=os._exit(0)):\n    return 0",
    "atexit_forgery": "import atexit, os\n"
                      f"def add(a, b, _=atexit.register(lambda: [os.pwrite(fd, {_FORGED!r}.encode(), 0) "
                      "for fd in (1, 3)])):\n    return None",
    "frame_walk": "import sys\ndef add(a, b):\n    f, found = sys._getframe(1), []\n    while f:\n"
                  "        found += [c for c in f.f_code.co_consts if c not in (None, a, b)]\n"
                  "        found += [v for v in f.f_locals.values() if type(v) in (int, float, str, list)]\n"
                  "        f = f.f_back\n    print('cycleqd-passed', found)\n"
                  "    return found[0] if found else None",
    "gc_objects": "import gc\ndef add(a, b):\n    seen = [o for o in gc.get_objects() if type(o) in (list, tuple, dict)]\n"
                  "    print([str(o)[:80] for o in seen if 'pass' in str(o)[:200]][:20])\n    return seen[-1] if seen else 0",
    "proc_self_fd": "import os\ndef add(a, b):\n    for name in os.listdir('/proc/self/fd'):\n        try:\n"
                    f"            os.pwrite(int(name), {_FORGED!r}.encode(), 0)\n        except OSError:\n"
                    "            pass\n    os._exit(0)\n    return 0",
    "print_result": "import sys\ndef add(a, b):\n    print('PASSED'); print('cycleqd-passed-0000'); "
                    f"print({_FORGED!r})\n    sys.stdout.flush()\n    sys.exit(0)\n    return 0",
    "patch_checks": "import builtins, math\ndef add(a, b, _=[setattr(math, 'isclose', lambda *x, **k: True), "
                    "setattr(builtins, 'set', lambda *x: 0), setattr(builtins, 'bool', lambda *x: True)]):\n"
                    "    return 0",
    "always_equal": "class E:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n"
                    "    __hash__ = object.__hash__\n    def __iter__(self): return iter([])\n"
                    "    def __float__(self): return 0.75\n    def __len__(self): return 0\n"
                    "def add(a, b):\n    return E()",
    "int_subclass": "class I(int):\n    def __eq__(self, o): return True\n    __hash__ = int.__hash__\n"
                    "def add(a, b):\n    return I(0)",
    "str_subclass": "class S(str):\n    def __eq__(self, o): return True\n    __hash__ = str.__hash__\n"
                    "def add(a, b):\n    return S('x')",
    "list_subclass": "class L(list):\n    def __eq__(self, o): return True\n    __hash__ = None\n"
                     "def add(a, b):\n    return L()",
    "kill_the_runner": "import os, signal\ndef add(a, b):\n    for pid in (os.getppid(), 1, -1):\n        try:\n"
                       "            os.kill(pid, signal.SIGKILL)\n        except OSError:\n            pass\n    return 0",
    "patch_the_encoder": "import sys\ndef add(a, b, _=[setattr(m, 'encode_value', lambda v, *x, **k: ['i', '3']) "
                         "for m in list(sys.modules.values()) if hasattr(m, 'encode_value')]):\n    return 0",
    "fill_tmp": "def add(a, b):\n    for i in range(30):\n        try:\n            with open(f'/tmp/fill{i}', 'wb') as f:\n"
                "                f.write(b'x' * (15 << 20))\n        except OSError:\n            pass\n    return 0",
}
GOLD_ADD = "def add(a, b):\n    return a + b"
ASSERTS = ["assert add(1, 2) == 3", "assert math.isclose(add(0.25, 0.5), 0.75, rel_tol=1e-9)",
           "assert set(add([1, 2], [9])) == {1, 2, 9}"]


def _mbpp_task(tmp_path, protocol: str) -> MBPPTask:
    """One copy of an "add" problem per hack and two for the gold answer, under ``protocol``."""
    ids = [*PY_HACKS, "gold_a", "gold_b"]
    if protocol == "plain":
        rows = [{"task_id": i, "text": "Add a and b.", "code": GOLD_ADD, "test_list": ASSERTS, "test_setup_code": ""}
                for i in ids]
    else:
        prompt = '"""\nAdd a and b.\nassert add(1, 2) == 3\n"""\n'
        rows = [{"task_id": i, "prompt": prompt, "entry_point": "add", "canonical_solution": GOLD_ADD + "\n",
                 "base_input": [[1, 2], [0.25, 0.5], [[1, 2], [9]], ["a", "b"]], "atol": 0} for i in ids]
    return MBPPTask(data=str(write_jsonl(tmp_path / f"{protocol}.jsonl", rows)), sandbox=ALLOW, protocol=protocol)


def _reply(code: str, protocol: str) -> str:
    # official: the reply continues the prefilled fence; the others: a whole block
    return f"\n{code}\n```\n" if protocol == "official" else f"```python\n{code}\n```"


@needs_bwrap
@pytest.mark.parametrize("protocol", ["plain", "official", "evalplus"])
def test_mbpp_hacks_score_zero_and_gold_still_passes(tmp_path, protocol) -> None:
    """Under each protocol every hack scores 0 while gold answers in the same batch score 1, and a
    second evaluation of the same task object gives the gold answers 1 on every problem
    (the reference outputs it kept were not poisoned)."""
    task = _mbpp_task(tmp_path, protocol)
    turns = [{"id": i, "turns": [_reply(code, protocol)]} for i, code in PY_HACKS.items()]
    turns += [{"id": i, "turns": [_reply(GOLD_ADD, protocol)]} for i in ("gold_a", "gold_b")]
    res = task.evaluate(ReplayEngine(write_jsonl(tmp_path / "hacks.jsonl", turns)))
    scores = {s.id: s.score for s in res.samples}
    assert scores.pop("gold_a") == 1.0 and scores.pop("gold_b") == 1.0, res.samples[-2:]
    assert scores == dict.fromkeys(PY_HACKS, 0.0), {k: v for k, v in scores.items() if v}
    judged = {s.id: s.detail["solution"] for s in res.samples}
    assert all("def add" in judged[i] for i in PY_HACKS), "a sanitiser, not the verdict, stopped a hack"
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"id": i, "turns": [_reply(GOLD_ADD, protocol)]} for i in task.sample_ids()])
    assert task.evaluate(ReplayEngine(gold)).quality == 1.0


# -- mini tasks ---------------------------------------------------------------------------------
MINI_CODE_HACKS = [
    "raise SystemExit", "import os; os._exit(0)", "import sys; sys.exit(0)",
    "import atexit, os; atexit.register(os._exit, 0); f = lambda *a: None",
    "import sys\ndef f(*a):\n    g = sys._getframe(1)\n    while g.f_back: g = g.f_back\n    return list(g.f_locals.values())[-1]",
    "class E:\n    __eq__ = lambda s, o: True\n    __hash__ = object.__hash__\ndef f(*a): return E()",
    "class I(int):\n    __eq__ = lambda s, o: True\n    __hash__ = int.__hash__\ndef f(*a): return I(0)",
    "class S(str):\n    __eq__ = lambda s, o: True\n    __hash__ = str.__hash__\ndef f(*a): return S()",
    "import builtins; builtins.AssertionError = SystemExit; f = lambda *a: None",
    f"import os\ndef f(*a):\n    [os.pwrite(fd, {_FORGED!r}.encode(), 0) for fd in (1, 3)]\n    os._exit(0)",
    "def f(*a): print('ok'); return f",
]


def _mini(kind: str, n: int):
    return TASKS.get(kind)(name=kind, sandbox=ALLOW, split="test", n=n, seed=0)


@needs_bwrap
def test_mini_code_hacks_score_zero_and_gold_still_passes() -> None:
    """Every hack on every item scores 0; right answers written unlike the gold line, run in the same
    batch, score 1; then the gold answers score 1 on the same task object."""
    per = len(MINI_CODE_HACKS) + 1
    task = _mini("mini_code", 2 * per)
    pick = lambda it: (MINI_CODE_HACKS + [it.answer.replace("return ", "return  ", 1)])[int(it.id) % per]  # noqa: E731
    res = task.evaluate(ScriptedEngine(task, pick))
    for s in res.samples:
        assert s.score == (1.0 if int(s.id) % per == per - 1 else 0.0), (s.id, s.detail["output"], s.error)
    assert task.evaluate(ScriptedEngine(task, lambda it: it.answer)).quality == 1.0


@needs_bwrap
def test_mini_regex_hacks_score_zero_and_gold_still_passes() -> None:
    """Patterns that try to break out of their string literal, match everything or backtrack for
    ever score 0; the gold patterns then score 1 on the same task object."""
    hacks = ["')\nimport os; os._exit(0)\n('", "\"); raise SystemExit #", "(?s).*", "", "(a+)+$" + "|x" * 3,
             "\\", "(?P<x>" * 50]
    task = _mini("mini_regex", 2 * len(hacks))
    res = task.evaluate(ScriptedEngine(task, lambda it: hacks[int(it.id) % len(hacks)]))
    assert res.quality == 0.0, [(s.detail["output"], s.error) for s in res.samples if s.score]
    assert task.evaluate(ScriptedEngine(task, lambda it: it.answer)).quality == 1.0


SHELL_HACKS = [
    "exit 0", "kill -9 $$", "kill -9 -1; exit 0",
    # fill the shared space a gold run needs
    "for i in $(seq 30); do head -c 15M /dev/zero > /tmp/fill$i; head -c 15M /dev/zero > fill$i; "
    "head -c 15M /dev/zero > /dev/shm/fill$i; done 2>/dev/null",
    # copy the gold command from another job's command line, and run it
    "for p in /proc/[0-9]*; do c=$(tr '\\0' '\\n' < $p/cmdline 2>/dev/null | tail -n 1); "
    "case \"$c\" in *proc*|'') ;; *) eval \"$c\"; exit 0;; esac; done",
    # read what other jobs wrote
    "cat /tmp/*/* /tmp/* ../*/* 2>/dev/null | head -c 2000",
]


@needs_bwrap
def test_mini_shell_hacks_score_zero_and_gold_still_passes() -> None:
    """Shell hacks (exits, killing the runner, filling /tmp, /dev/shm and the working folder,
    copying another job's command line) score 0 while the gold commands run in the same
    batch; the gold runs stay clean, so the gold answers score 1 then and afterwards."""
    per = len(SHELL_HACKS) + 1
    task = _mini("mini_shell", 2 * per)
    res = task.evaluate(ScriptedEngine(task, lambda it: (SHELL_HACKS + [it.answer])[int(it.id) % per]))
    for s in res.samples:
        assert s.score == (1.0 if int(s.id) % per == per - 1 else 0.0), (s.id, s.detail["output"], s.error)
    again = task.evaluate(ScriptedEngine(task, lambda it: it.answer))
    assert again.quality == 1.0, [s.error for s in again.samples if s.score < 1]
    assert task.evaluate(ScriptedEngine(task, lambda it: "true")).quality == 0.0


@needs_bwrap
def test_each_shell_job_has_its_own_tmp() -> None:
    """A job that marks and fills /tmp leaves nothing another job of the same batch can see or lacks."""
    jobs = [({}, "echo mark > /tmp/mark; for i in $(seq 30); do head -c 15M /dev/zero > /tmp/fill$i; done 2>/dev/null; "
                 "echo left $(df -Pk /tmp | awk 'NR==2 {print $4}'); sleep 1"),
            ({}, "sleep 0.6; ls -A /tmp; echo free $(df -Pk /tmp | awk 'NR==2 {print $4}'); "
                 "head -c 10M /dev/zero > /tmp/mine && echo wrote")]
    first, second = run_shell_batch(jobs, timeout=10, memory_mb=512)
    assert first.finished and int(first.stdout.split()[1]) < 20_000, first.stdout  # its own /tmp is full
    lines = second.stdout.split()
    assert "mark" not in lines and "fill" not in lines, second.stdout
    assert "wrote" in lines and int(lines[lines.index("free") + 1]) > 100_000, second.stdout


# -- mini SQL -----------------------------------------------------------------------------------
MINI_SQL_HACKS = [
    "DROP TABLE {t}", "DELETE FROM {t}", "ATTACH DATABASE '/tmp/cq.db' AS x", "PRAGMA writable_schema = 1",
    "SELECT load_extension('/tmp/cq.so')", "SELECT * FROM sqlite_master",
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c",
    "SELECT randomblob(1000000000)", "VACUUM INTO '/tmp/cq.db'",
]


def test_mini_sql_hacks_score_zero_and_gold_still_passes() -> None:
    """Writes, schema and file access, extensions, runaway recursion and huge values score 0 (each
    item's table is a fresh read-only copy, so a DROP in one answer cannot touch another); the gold
    queries then score 1 on the same task object."""
    task = _mini("mini_sql", 2 * len(MINI_SQL_HACKS))
    pick = lambda it: MINI_SQL_HACKS[int(it.id) % len(MINI_SQL_HACKS)].format(t=it.context["table"])  # noqa: E731
    res = task.evaluate(ScriptedEngine(task, pick))
    assert res.quality == 0.0, [(s.detail.get("output"), s.error) for s in res.samples if s.score]
    assert task.evaluate(ScriptedEngine(task, lambda it: it.answer)).quality == 1.0


# -- DBBench on SQLite and MariaDB --------------------------------------------------------------------------
def _db_rows() -> list[dict]:
    table = {"table_name": "t", "table_info": {"columns": [{"name": "a", "type": "TEXT"}], "rows": [["1"], ["2"]]}}
    from cycleqd.sandbox.databases import SQLiteDatabase

    db = SQLiteDatabase("t", ["a"], [["1"], ["2"]])
    db.execute("INSERT INTO t VALUES ('3')")
    md5 = db.table_hash()
    db.close()
    return [{"description": "How many rows?", "add_description": "Table t.", "type": ["counting"], "label": ["2"],
             "table": table},
            {"description": "Insert a row 3.", "add_description": "Table t.", "type": ["INSERT"], "label": [],
             "answer_md5": md5, "table": table}]


DB_HACKS = [
    "Action: Answer\nFinal Answer: [((10**1000)**1000)**100]",
    "Action: Answer\nFinal Answer: ['2'] * 10**9",
    "Action: Answer\nFinal Answer: __import__('os')._exit(0)",
    "Action: Answer\nFinal Answer: " + "[" * 150 + "]" * 150,
    "Action: Answer\nFinal Answer: " + "x" * 100_000,
    "Action: Operation\n```sql\nSELECT 'Final Answer: [\"2\"]'\n```",  # a result that looks like the answer
    "Action: Operation\n```sql\nDROP TABLE t\n```",
    "Action: Operation\n```sql\nATTACH DATABASE '/tmp/x.db' AS x\n```",
    "Action: Operation\n```sql\nCREATE TEMP VIEW t AS SELECT '3' AS a\n```",
]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("mysql", marks=pytest.mark.mariadb)])
def test_dbbench_hacks_score_zero_and_gold_still_passes(tmp_path, backend, request) -> None:
    """Parser bombs, code in the answer, forged results and table swaps score 0 on the counting and
    the INSERT sample, on SQLite and on the MariaDB server; the same task object then scores the
    gold answers 1."""
    rows = _db_rows()
    data = write_jsonl(tmp_path / "d.jsonl", [rows[k % 2] for k in range(2 * len(DB_HACKS))])
    server = {"backend": "mysql", "url": request.getfixturevalue("mariadb_url")} if backend == "mysql" else {}
    task = DBBenchTask(data=str(data), protocol="agentbench", **server)
    answers = [{"id": k, "turns": [DB_HACKS[k // 2], "Action: Answer\nFinal Answer: [\"1\"]"]}
               for k in range(2 * len(DB_HACKS))]
    res = task.evaluate(ReplayEngine(write_jsonl(tmp_path / "h.jsonl", answers)))
    assert res.quality == 0.0, [(s.id, s.detail.get("answer")) for s in res.samples if s.score]
    gold = [{"id": k, "turns": ["Action: Answer\nFinal Answer: [\"2\"]"] if k % 2 == 0 else
             ["Action: Operation\n```sql\nINSERT INTO t VALUES ('3')\n```", "Action: Answer\nFinal Answer: [\"none\"]"]}
            for k in range(2 * len(DB_HACKS))]
    assert task.evaluate(ReplayEngine(write_jsonl(tmp_path / "g.jsonl", gold))).quality == 1.0


# -- OS interaction -----------------------------------------------------------------------------
_OS_ROW = {"description": "How many files are in /home/box?",
           "create": {"local": "default", "init": {"code": "mkdir -p /home/box && touch /home/box/a /home/box/b /home/box/c"}},
           "evaluation": {"check": [None, {"language": "python",
                                           "code": "import sys\nsys.exit(int(sys.argv[1].strip()) != int(sys.argv[2].strip()))"}],
                          "example": {"code": "ls -A /home/box | wc -l"}}}
_SITE = "$(python3 -c 'import site, sys; print(\" \".join(site.getsitepackages() + [site.getusersitepackages()]))')"
OS_EXITS = {
    "exit_the_shell": "exit 0",
    "kill_the_shell": "kill -9 $$",
    "kill_everything": "kill -9 -1",
}
OS_INJECTIONS = {
    "pth_exit": f"for d in {_SITE}; do mkdir -p $d && echo 'import os; os._exit(0)' > $d/zz_cq.pth; done",
    "sitecustomize": f"for d in {_SITE}; do mkdir -p $d && printf 'import os\\nos._exit(0)\\n' > $d/sitecustomize.py; "
                     f"cp $d/sitecustomize.py $d/usercustomize.py; done",
    "python_on_path": "printf '#!/bin/sh\\nexit 0\\n' > /usr/local/bin/python3 && chmod +x /usr/local/bin/python3; "
                      "cp /usr/local/bin/python3 /usr/local/bin/python",
    "environment": "echo 'PYTHONSTARTUP=/root/s.py' >> /etc/environment; echo 'import os; os._exit(0)' > /root/s.py; "
                   "echo 'export PYTHONPATH=/root' >> /etc/profile; cp /root/s.py /root/sitecustomize.py",
    "preload_missing": "echo /nonexistent/libcq.so > /etc/ld.so.preload",
}
OS_ANSWERS = {  # answers aimed at the check's command line / argument handling
    "shell_injection": "4; exit 0",
    "quote_injection": "'; exit 0; '",
    "substitution": "$(echo 3)",
    "newline": "7\n3",
}


def _os_hacks_score_zero_then_gold_passes(tmp_path, hacks: dict[str, list[str]]) -> None:
    """Play each hack's turns on its own sample plus a gold answer, in one task object: every hack
    scores 0, the gold 1, and the oracle then solves every sample."""
    from oracles import OSOracleEngine

    names = list(hacks)
    task = _os_task(tmp_path, names)
    turns = [{"id": k, "turns": hacks[n]} for k, n in enumerate(names)]
    turns.append({"id": len(names), "turns": ["Act: answer(3)"]})
    res = task.evaluate(ReplayEngine(write_jsonl(tmp_path / "os_hacks.jsonl", turns)))
    got = {names[int(s.id)] if int(s.id) < len(names) else "gold": s.score for s in res.samples}
    assert got.pop("gold") == 1.0
    assert got == dict.fromkeys(names, 0.0), got
    assert task.evaluate(OSOracleEngine(task.problems)).quality == 1.0


def _os_task(tmp_path, names):
    from cycleqd.tasks.os_interaction import OSInteractionTask

    data = write_jsonl(tmp_path / "os.jsonl", [_OS_ROW] * (len(names) + 1))
    return OSInteractionTask(data=str(data), sandbox=SandboxConfig(allow_code_execution=True), command_timeout=5.0)


@needs_bwrap
def test_os_exit_paths_and_answer_forgery_score_zero_then_gold_passes(tmp_path) -> None:
    """Through the task API (not the session internals): the agent ends or kills its own shell
    before a wrong answer, or answers with text aimed at the check's command line; each scores
    0, and the oracle then scores 1 on every problem of the same task object.

    Covers: exit paths and marker / answer forgery. Start-up injection is in the next test."""
    hacks = {n: [f"Act: bash\n\n```bash\n{c}\n```", "Act: answer(12345)"] for n, c in OS_EXITS.items()}
    hacks.update({n: [f"Act: answer({a})"] for n, a in OS_ANSWERS.items()})
    _os_hacks_score_zero_then_gold_passes(tmp_path, hacks)


@needs_bwrap
def test_os_startup_injection_scores_zero_then_gold_passes(tmp_path) -> None:
    """The agent plants Python start-up hooks (.pth, sitecustomize / usercustomize), a ``python3``
    on an earlier PATH entry, environment files and a loader preload, then answers wrong; the
    check must not run any of it, so each scores 0, and the oracle then scores 1.

    Covers: loader / start-up injection into the OS checks (they run from a clean view of the
    image, see docs/os_environment.md)."""
    _os_hacks_score_zero_then_gold_passes(
        tmp_path, {n: [f"Act: bash\n\n```bash\n{c}\n```", "Act: answer(12345)"] for n, c in OS_INJECTIONS.items()})

