"""Verdicts from values judged outside the job: answers that try to pass without solving score 0."""
from __future__ import annotations

import ast
import builtins
import json
import time
from pathlib import Path

import pytest

from cycleqd.sandbox import bwrap_available
from cycleqd.sandbox._runner import Unencodable, decode_results, decode_value, encode_value
from cycleqd.sandbox.verdict import AssertJob, check_asserts, check_asserts_batch, split_assert, trusted_namespace

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mbpp" / "mbpp.jsonl"
needs_bwrap = pytest.mark.skipif(not bwrap_available(), reason="bubblewrap (bwrap) missing or cannot start here")

ASSERTS = (
    "assert add(1, 2) == 3",
    "assert math.isclose(add(0.25, 0.5), 0.75, rel_tol=1e-9)",
    "assert set(add([1, 2], [2, 9])) == {1, 2, 9}",
    "assert add(20, 22) == 42 and add('a', 'b') == 'ab'",
)
GOLD = "def add(a, b):\n    return a + b\n"

HACKS = {
    "raise_systemexit": "raise SystemExit",
    "exit0_at_import": "import sys\nsys.exit(0)",
    "os_exit_at_import": "import os\nos._exit(0)",
    "exit_inside_call": "import os\ndef add(a, b):\n    os._exit(0)",
    "systemexit_inside_call": "def add(a, b):\n    raise SystemExit(0)",
    "always_equal": "class E:\n    def __eq__(self, o): return True\n    __hash__ = object.__hash__\n"
                    "    def __iter__(self): return iter([1, 2, 9])\n    def __float__(self): return 0.75\n"
                    "def add(a, b):\n    return E()",
    "int_subclass": "class I(int):\n    def __eq__(self, o): return True\n    __hash__ = int.__hash__\n"
                    "def add(a, b):\n    return I(0)",
    "str_subclass": "class S(str):\n    def __eq__(self, o): return True\n    __hash__ = str.__hash__\n"
                    "def add(a, b):\n    return S('x')",
    "patch_builtins": "import builtins, math\nmath.isclose = lambda *a, **k: True\nbuiltins.set = lambda *a: 0\n"
                      "set = lambda *a: 0\nbuiltins.bool = lambda *a: True\ndef add(a, b):\n    return 0",
    "frame_walk": "import sys, gc\ndef add(a, b):\n    f, found = sys._getframe(1), []\n    while f:\n"
                  "        found += [c for c in f.f_code.co_consts if type(c) is int and c > 2]\n"
                  "        found += [v for v in f.f_globals.values() if type(v) is int and v > 2]\n        f = f.f_back\n"
                  "    found += [o for o in gc.get_objects() if type(o) is str and 'assert' in o]\n"
                  "    print('cycleqd-passed', found)\n    return found[0] if found else -1",
    "atexit_forgery": "import atexit, os\natexit.register(lambda: os.pwrite(3, b'{\"r\": []}', 0))\n"
                      "def add(a, b):\n    return None",
    "every_fd": "import os\nforged = json = b'{\"r\": [[\"ok\", true, 0.0]]}'\nfor fd in range(1025):\n"
                "    try:\n        os.pwrite(fd, forged, 0)\n    except OSError:\n        pass\nos._exit(0)",
    "stdout_forgery": "import sys\nprint('{\"r\": [[\"ok\", [\"i\", \"3\"], 0.0]]}')\nprint('PASSED')\nsys.exit(0)",
    "signals": "import os, signal\nfor s in (signal.SIGTERM, signal.SIGALRM, signal.SIGCHLD):\n"
               "    signal.signal(s, signal.SIG_IGN)\nfor pid in (os.getppid(), 1, -1):\n    try:\n"
               "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\ndef add(a, b):\n    return 0",
    "outliving_thread": "import os, threading, time\ndef late():\n    time.sleep(0.2)\n"
                        "    os.pwrite(3, b'{\"r\": [[\"ok\", true, 0.0]]}', 0)\n"
                        "threading.Thread(target=late).start()\nif os.fork() == 0:\n    late()\n    os._exit(0)\n"
                        "def add(a, b):\n    return 0",
    "patch_encoder": "import sys\nr = sys.modules['__main__']\nr.encode_value = lambda v, *a: True\n"
                     "def add(a, b):\n    return 0",
    "true_for_all": "def add(a, b):\n    return True",
}


@needs_bwrap
def test_reward_hacks_score_zero_while_gold_passes_in_the_same_batch() -> None:
    """Every hack (exit paths, forged results, frame walking, patched checks, lying objects)
    fails every assertion; the gold answer, before and after them in the same batch, passes all."""
    jobs = [AssertJob(GOLD, ASSERTS)] + [AssertJob(code, ASSERTS) for code in HACKS.values()] + [AssertJob(GOLD, ASSERTS)]
    out = check_asserts_batch(jobs, timeout=5, memory_mb=256)
    assert [v.passed for v in out[0]] == [True] * len(ASSERTS), out[0]
    assert [v.passed for v in out[-1]] == [True] * len(ASSERTS), out[-1]
    for name, verdicts in zip(HACKS, out[1:-1]):
        assert not any(v.passed for v in verdicts), (name, verdicts)
        assert all(v.error for v in verdicts), (name, verdicts)


@needs_bwrap
def test_wrong_answers_fail_and_partly_right_answers_pass_what_they_solve() -> None:
    """A verdict per assertion: an answer right on ints only passes exactly the int assertions."""
    ints_only = "def add(a, b):\n    if type(a) is not int:\n        raise TypeError('ints only')\n    return a + b\n"
    verdicts = check_asserts(ints_only, ASSERTS, timeout=5, memory_mb=256)
    assert [v.passed for v in verdicts] == [True, False, False, False]
    assert "raised TypeError" in verdicts[1].error


def test_split_sends_only_candidate_calls_to_the_job() -> None:
    """Expected values, comparisons and trusted functions stay outside; a redefined builtin does not move."""
    trusted = set(trusted_namespace()) | set(dir(builtins))
    cases = {
        "assert math.isclose(f(1, 2), 1.2, rel_tol=0.001)": (("f(1, 2)",), "math.isclose(_cq_v0, 1.2, rel_tol=0.001)"),
        "assert set(f(x)) == set([3, 4])": (("f(x)",), "set(_cq_v0) == set([3, 4])"),
        "assert f(3)==True": (("f(3)",), "_cq_v0 == True"),
        "assert (g(f(1))) == 3": (("g(f(1))",), "_cq_v0 == 3"),
        "assert all(x > 0 for x in f(1))": (("f(1)",), "all((x > 0 for x in _cq_v0))"),
        "assert Pair(1, 2).total() == 3": (("Pair(1, 2).total()",), "_cq_v0 == 3"),
    }
    for text, (calls, test) in cases.items():
        s = split_assert(text, trusted)
        assert (s.calls, ast.unparse(s.test)) == (calls, test), text
    # an entry point that shares a builtin's name is the candidate's only when named so
    assert split_assert("assert sum(10, 15) == 6", trusted).calls == ()
    assert split_assert("assert sum(10, 15) == 6", trusted, ["sum"]).calls == ("sum(10, 15)",)


def test_codec_is_exact_and_bounded() -> None:
    """Plain values round-trip exactly; subclasses and foreign types are refused; the decoder
    refuses deep, huge or malformed input quickly, without evaluating anything."""
    import collections

    values = [None, True, 0, -7, 2 ** 300, 1.5, -0.0, float("inf"), 2j, "s\u00e9", b"\x00\xff",
              [1, (2, {3: frozenset({4})})], {"a": {1, 2}}, collections.Counter("aab"), collections.deque([1])]
    for v in values:
        back = decode_value(json.loads(json.dumps(encode_value(v))))
        assert back == v and type(back) is type(v)
    class MyInt(int):
        pass
    for bad in (MyInt(1), [object()], {"k": MyInt(2)}, collections.namedtuple("P", "x")(1), 10 ** 30000):
        with pytest.raises(Unencodable):
            encode_value(bad)
    deep = [[]]
    for _ in range(200):
        deep = [deep]
    with pytest.raises(Unencodable):
        encode_value(deep)
    t = time.monotonic()
    for text in ("[" * 100000, '{"r": [["ok", ' + '["l", ' * 500 + "null" + "]" * 500 + ", 0.0]]}",
                 '{"r": [["ok", ["i", "' + "f" * 20000 + '"], 0.0]]}', '{"r": [["ok", ["s", ["l"]], 0.0]]}',
                 '{"r": [["ok", ["x", 1], 0.0]]}', '{"r": "__import__(\'os\').system(\'id\')"}', "x" * (2 << 20)):
        with pytest.raises(ValueError):
            decode_results(text)
    assert time.monotonic() - t < 2.0


@needs_bwrap
@pytest.mark.skipif(not DATA.exists(), reason="MBPP data (../shared/data/mbpp/mbpp.jsonl) not present")
def test_mbpp_reference_solutions_pass() -> None:
    """A sample of MBPP's reference solutions (Counter results and a builtin-named entry point among
    them) pass their own test_list under the split verdict, in one batch."""
    from cycleqd.tasks.mbpp import entry_point_of

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    chosen = [r for k, r in enumerate(rows) if k % 12 == 0 or r["task_id"] in (40, 126, 653, 902) or
              r.get("test_setup_code")]
    jobs = [AssertJob(r["code"], tuple(r["test_list"]), r.get("test_setup_code") or "",
                      candidate_names=(entry_point_of(r["test_list"][0], r["code"]),)) for r in chosen]
    out = check_asserts_batch(jobs, timeout=20, memory_mb=512)
    failed = {r["task_id"]: [v.error for v in vs if not v.passed] for r, vs in zip(chosen, out)
              if not all(v.passed for v in vs)}
    assert not failed, failed
