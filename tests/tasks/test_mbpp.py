"""MBPP: prompt, sanitizer, data formats, and replay of reference solutions on all 974 problems."""
from __future__ import annotations

import json
import time

import pytest

from answers import mbpp_answers, write_jsonl
from cycleqd.config import SandboxConfig
from cycleqd.engine.replay import ReplayEngine
from cycleqd.sandbox import CodeExecutionNotAllowed
from cycleqd.score import score
from cycleqd.tasks.mbpp import MBPPTask, chat_prompt, extract_code, sanitize

ALLOW = SandboxConfig(allow_code_execution=True, timeout=10)


def test_prompt_follows_the_cycleqd_template() -> None:
    p = chat_prompt('"""\nWrite a function.\nassert f(1) == 2\n"""\n')
    assert p.startswith("You are an exceptionally intelligent coding assistant")
    assert "\n\n@@ Instruction:\n" in p and p.endswith("\n\n@@ Response:")
    assert "assert f(1) == 2" in p


def test_sanitize_keeps_definitions_and_drops_examples() -> None:
    completion = ("Here is the code:\n```python\nimport math\nK = 3\n\n@staticmethod\ndef g(x):\n    return x\n"
                  "def f(x):\n    return math.sqrt(x) + K\n\nprint(f(4))\nassert f(4) == 5\n"
                  "if __name__ == '__main__':\n    f(1)\n```\nDone.")
    code = sanitize(completion)
    assert "import math" in code and "K = 3" in code and "@staticmethod" in code and "def f(x)" in code
    assert "print(" not in code and "assert" not in code and "__main__" not in code
    assert extract_code("def h():\n    return 1") == "def h():\n    return 1"
    # Cut off by the token limit: the unfinished tail is dropped, the rest still runs.
    assert sanitize("```python\ndef f():\n    return 1\ndef g(:\n") == "def f():\n    return 1"


def test_mbpp_plus_rows_with_assertions_or_base_inputs(tmp_path) -> None:
    rows = [
        {"task_id": "Mbpp/2", "prompt": '"""\nAdd one.\nassert add1(1) == 2\n"""\n', "entry_point": "add1",
         "canonical_solution": "def add1(x):\n    return x + 1\n", "assertion": "assert add1(1) == 2\nassert add1(5) == 6"},
        {"task_id": "Mbpp/3", "prompt": '"""\nDouble.\n"""\n', "entry_point": "dbl",
         "canonical_solution": "def dbl(x):\n    return 2 * x\n", "base_input": [[1], [2.5], [-3]], "atol": 0},
    ]
    data = write_jsonl(tmp_path / "plus.jsonl", rows)
    good = write_jsonl(tmp_path / "g.jsonl", [{"id": "Mbpp/2", "turns": ["```python\ndef add1(x):\n    return x+1\n```"]},
                                               {"id": "Mbpp/3", "turns": ["def dbl(y):\n    return y * 2"]}])
    bad = write_jsonl(tmp_path / "b.jsonl", [{"id": "Mbpp/2", "turns": ["def add1(x):\n    return x"]},
                                              {"id": "Mbpp/3", "turns": ["def dbl(y):\n    return y ** 2"]}])
    task = MBPPTask(data=str(data), sandbox=ALLOW)
    assert task.sample_ids() == ["Mbpp/2", "Mbpp/3"]
    assert task.evaluate(ReplayEngine(good)).quality == 1.0
    res = task.evaluate(ReplayEngine(bad))
    assert res.quality == 0.0 and res.failed_ids == ["Mbpp/2", "Mbpp/3"]
    assert all("AssertionError" in s.error for s in res.samples)


def test_code_execution_needs_the_opt_in(shared_data) -> None:
    task = MBPPTask(data=str(shared_data / "mbpp/mbpp.jsonl"), sandbox=SandboxConfig(), limit=2)
    with pytest.raises(CodeExecutionNotAllowed):
        task.evaluate(ReplayEngine.__new__(ReplayEngine))


def test_hostile_completions_fail_their_sample_only(shared_data, tmp_path) -> None:
    turns = {"2": "```python\ndef similar_elements(a, b):\n    while True:\n        pass\n```",
             "3": "```python\ndef is_not_prime(n):\n    return open('/etc/shadow').read()\n```",
             "4": "```python\ndef heap_queue_largest(nums, n):\n    return bytearray(10 * 1024 ** 3)\n```"}
    answers = write_jsonl(tmp_path / "a.jsonl", [{"id": k, "turns": [v]} for k, v in turns.items()])
    task = MBPPTask(data=str(shared_data / "mbpp/mbpp.jsonl"), sandbox=SandboxConfig(allow_code_execution=True,
                    timeout=1.5, memory_mb=256), ids=["2", "3", "4"])
    t = time.monotonic()
    res = task.evaluate(ReplayEngine(answers))
    assert res.quality == 0.0 and time.monotonic() - t < 10
    errors = {s.id: s.error for s in res.samples}
    assert "timed out" in errors["2"]
    assert "MemoryError" in errors["4"]
    assert "PermissionError" in errors["3"] or "No such file" in errors["3"]


@pytest.mark.slow
def test_reference_solutions_pass_and_stubs_fail_on_all_974(shared_data, tmp_path) -> None:
    good, bad = mbpp_answers(shared_data / "mbpp/mbpp.jsonl", tmp_path)
    data = str(shared_data / "mbpp/mbpp.jsonl")
    t = time.monotonic()
    res = score("mbpp", data, answers=str(good), ids=None)
    took = time.monotonic() - t
    print(f"MBPP reference replay: {res.quality:.4f} of {res.n} in {took:.1f}s; failed: "
          + json.dumps({s.id: s.error for s in res.samples if s.score < 1}))
    assert res.n == 974 and res.quality >= 0.97
    assert took < 90
    res_bad = score("mbpp", data, answers=str(bad), ids=None)
    assert res_bad.quality <= 0.01
