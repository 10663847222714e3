"""MBPP: the official prompt and sanitiser pinned case by case, EvalPlus base tests, the
protocols, and replays of reference solutions on all 974 problems."""
from __future__ import annotations

import json

import pytest
from answers import mbpp_answers, mbpp_official_answers, write_jsonl

from cycleqd.config import ConfigError, SandboxConfig
from cycleqd.engine.answers import ReplayEngine
from cycleqd.sandbox import CodeExecutionNotAllowed
from cycleqd.studies.score import score
from cycleqd.tasks.mbpp import (
    STOP,
    MBPPTask,
    evalplus_message,
    extract_code,
    official_prompt,
    official_sanitize,
    problem_from_row,
    sanitize,
)

ALLOW = SandboxConfig(allow_code_execution=True, timeout=10)
SYSTEM = ("You are an exceptionally intelligent coding assistant that consistently delivers accurate and reliable "
          "responses to user instructions.")


class TestOfficialPrompt:
    """The prompt text, exactly as the official code builds it."""

    def test_mbpp_plus_docstring(self) -> None:
        row = {"task_id": "Mbpp/2", "entry_point": "similar_elements", "canonical_solution": "x",
               "prompt": '"""\nWrite a function to find the shared elements from the given two lists.\n'
                         'assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"""\n',
               "base_input": [[[1], [1]]]}
        assert official_prompt(problem_from_row(row)) == (
            f"{SYSTEM}\n\n@@ Instruction:\n"
            "Write a function to find the shared elements from the given two lists. "
            "Your code should satisfy the following assertion:\n```python\n"
            "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n```"
            "\n\n@@ Response:```python")

    def test_plain_mbpp_text_and_first_test_period_added(self) -> None:
        row = {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given "
                                      "character from the string", "code": "def remove_Occ(s,ch):\n  return s",
               "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"'],
               "test_setup_code": ""}
        assert official_prompt(problem_from_row(row)) == (
            f"{SYSTEM}\n\n@@ Instruction:\n"
            "Write a python function to remove first and last occurrence of a given character from the string. "
            "Your code should satisfy the following assertion:\n```python\n"
            'assert remove_Occ("hello","l") == "heo"\n```\n\n@@ Response:```python')

    def test_stops_and_request(self, tmp_path) -> None:
        assert STOP == ("Instruction:", "Instruction", "Response:", "Response")
        row = {"task_id": 1, "text": "Add one.", "code": "def f(x):\n    return x + 1",
               "test_list": ["assert f(1) == 2"]}
        task = MBPPTask(data=str(write_jsonl(tmp_path / "m.jsonl", [row])), protocol="official")
        req = task.request(task.problems["1"])
        assert req.stop == STOP and req.messages is None and req.prompt.endswith("@@ Response:```python")
        ev = MBPPTask(data=str(tmp_path / "m.jsonl"), protocol="evalplus").request(task.problems["1"])
        assert ev.prompt is None and ev.messages[0]["content"] == evalplus_message(task.problems["1"])
        assert ev.messages[0]["content"].startswith("Please provide a self-contained Python script")


    def test_prompt_equals_official_template_render_for_every_problem(self, shared_data) -> None:
        """Every MBPP problem's prompt equals, character for character, fishfarm's render: the official
        MBPP chat template with a generation prompt, then the prefill appended with no newline."""
        from fishfarm_reference import MBPP, MBPP_PREFILL, into_prompt

        from cycleqd.mini.tokenizer import make_char_tokenizer
        from cycleqd.tasks.mbpp.prompts import SYSTEM as TASK_SYSTEM
        from cycleqd.tasks.mbpp.prompts import official_instruction

        tok = make_char_tokenizer()
        rows = [json.loads(line) for line in (shared_data / "mbpp/mbpp.jsonl").read_text().splitlines()]
        rows += _plus_rows()  # MBPP+ rows: the docstring's text before its assert
        assert len(rows) == 976
        for row in rows:
            p = problem_from_row(row)
            messages = [{"role": "system", "content": TASK_SYSTEM},
                        {"role": "user", "content": official_instruction(p.text, p.assertion)}]
            assert official_prompt(p) == into_prompt(tok, messages, MBPP, MBPP_PREFILL), p.id
        assert official_prompt(problem_from_row(rows[0])).endswith("@@ Response:```python")


class TestOfficialSanitizer:
    """Each case against the official code (cut at the first fence, then EvalPlus's sanitiser of its time)."""

    @pytest.mark.parametrize("reply", [
        "\ndef f(x): return x + 1\n```",            # one-line def
        "\ndef f(x):\n  return x + 1\n```",         # 2-space indent
        "\ndef f(x):\n\treturn x + 1\n```",         # tab indent
        "\ndef f(x):\n   return x + 1\n```",        # 3 spaces: rejected before the 3->4 repair
        "\ndef f(x):\n    print(x + 1)\n```",       # a missing return
    ])
    def test_rejected_bodies_leave_nothing(self, reply) -> None:
        assert official_sanitize(reply, "f") == ""

    def test_without_the_entry_point_the_code_stays(self) -> None:
        assert official_sanitize("\ndef g(x):\n    return x\n```", "f") == "def g(x):\n    return x"

    def test_trailing_prose_without_a_closing_fence(self) -> None:
        reply = "\nimport math\n\ndef f(x):\n    return math.floor(x)\n\nThis function floors x.\nIt uses math."
        assert official_sanitize(reply, "f") == "import math\n\ndef f(x):\n    return math.floor(x)"

    def test_several_code_blocks_keep_the_first(self) -> None:
        reply = "\ndef f(x):\n    return 1\n```\n\nOr:\n```python\ndef f(x):\n    return 2\n```"
        assert official_sanitize(reply, "f") == "def f(x):\n    return 1"

    def test_helpers_kept_examples_cut(self) -> None:
        reply = "\ndef g(y):\n    return y\ndef f(x):\n    return g(x)\n\nx = 3\nif __name__ == '__main__':\n    print(f(3))\n"
        assert official_sanitize(reply, "f") == "def g(y):\n    return y\ndef f(x):\n    return g(x)"
        # an unindented print ends the code, later definitions included
        assert official_sanitize("\ndef f(x):\n    return x\nprint(f(2))\ndef h():\n    return 0\n", "f") == \
            "def f(x):\n    return x"

    def test_nested_returns_and_broken_helpers(self) -> None:
        assert official_sanitize("\ndef f(x):\n    def inner():\n        return x\n    return inner()\n```", "f") == \
            "def f(x):\n    def inner():\n        return x\n    return inner()"
        assert official_sanitize("\ndef f(x):\n    return x\ndef g(:\n    return 1\n```", "f") == \
            "def f(x):\n    return x"

    def test_a_reply_that_repeats_the_prefill(self) -> None:
        assert official_sanitize("```python\ndef f(x):\n    return x\n```", "f") == "def f(x):\n    return x"
        # a bare fence first closes the prefilled block: nothing is left
        assert official_sanitize("```\ndef f(x):\n    return x\n```", "f") == ""


def test_ast_sanitizer_keeps_definitions_and_drops_examples() -> None:
    completion = ("Here is the code:\n```python\nimport math\nK = 3\n\n@staticmethod\ndef g(x):\n    return x\n"
                  "def f(x):\n  return math.sqrt(x) + K\n\nprint(f(4))\nassert f(4) == 5\n"
                  "if __name__ == '__main__':\n    f(1)\n```\nDone.")
    code = sanitize(completion)
    assert "import math" in code and "K = 3" in code and "@staticmethod" in code and "def f(x)" in code
    assert "print(" not in code and "assert" not in code and "__main__" not in code
    assert extract_code("def h():\n    return 1") == "def h():\n    return 1"
    assert sanitize("```python\ndef f():\n    return 1\ndef g(:\n") == "def f():\n    return 1"


def _plus_rows() -> list[dict]:
    return [
        {"task_id": "Mbpp/3", "prompt": '"""\nWrite a function to halve a number\nassert half(4) == 2.0\n"""\n',
         "entry_point": "half", "canonical_solution": "def half(x):\n    return x / 3 * 1.5\n",
         "base_input": [[4], [1], [10]], "atol": 0},
        {"task_id": "Mbpp/4", "prompt": '"""\nSum a list.\nassert total([1, 2]) == 3\n"""\n',
         "entry_point": "total", "canonical_solution": "def total(xs):\n    return sum(xs)\n",
         "base_input": [[[1, 2]], [[]], [[5, 5, 5]]], "atol": 0},
    ]


class TestEvalPlusBaseTests:
    """MBPP+ rows: outputs compared with the canonical solution's, floats within 1e-6, per-input time limits."""

    def _run(self, tmp_path, replies: dict[str, str], protocol: str = "official"):
        data = write_jsonl(tmp_path / "plus.jsonl", _plus_rows())
        answers = write_jsonl(tmp_path / "a.jsonl", [{"id": k, "turns": [v]} for k, v in replies.items()])
        task = MBPPTask(data=str(data), sandbox=ALLOW, protocol=protocol)
        return {s.id: s for s in task.evaluate(ReplayEngine(answers)).samples}

    def test_default_protocol_for_mbpp_plus_is_official(self, tmp_path) -> None:
        assert MBPPTask(data=str(write_jsonl(tmp_path / "p.jsonl", _plus_rows()))).protocol == "official"

    def test_outputs_and_float_tolerance(self, tmp_path) -> None:
        res = self._run(tmp_path, {
            "Mbpp/3": "\ndef half(x):\n    return x / 2 + 1e-9\n```",   # within 1e-6 of the canonical float
            "Mbpp/4": "\ndef total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n```"})
        assert res["Mbpp/3"].score == 1.0 and res["Mbpp/4"].score == 1.0
        res = self._run(tmp_path, {"Mbpp/3": "\ndef half(x):\n    return x / 2 + 1e-4\n```",
                                   "Mbpp/4": "\ndef total(xs):\n    return len(xs)\n```"})
        assert res["Mbpp/3"].score == 0.0 and "base input" in res["Mbpp/3"].error
        assert res["Mbpp/4"].score == 0.0 and "expected" in res["Mbpp/4"].error

    def test_time_limit_per_input_and_early_exits(self, tmp_path) -> None:
        res = self._run(tmp_path, {
            "Mbpp/3": "\nimport time\ndef half(x):\n    time.sleep(1.0)\n    return x / 2\n```",
            "Mbpp/4": "\nimport os\ndef total(xs):\n    os._exit(0)\n    return 0\n```"})
        assert res["Mbpp/3"].score == 0.0 and "timed out on base input 0" in res["Mbpp/3"].error
        assert res["Mbpp/4"].score == 0.0

    def test_inputs_get_evalplus_argument_types(self, tmp_path) -> None:
        from cycleqd.tasks.mbpp import deserialize_inputs

        assert deserialize_inputs("Mbpp/2", [[[3, 4], [4, 5]]]) == [[(3, 4), (4, 5)]]
        assert deserialize_inputs("Mbpp/63", [[[[1, 2], [3, 4]]]]) == [[[(1, 2), (3, 4)]]]
        assert deserialize_inputs("Mbpp/124", [[1, "1+2j"]]) == [(1.0, 1 + 2j)]
        assert deserialize_inputs("Mbpp/580", [[[1, [2, 3]], 4]]) == [((1, (2, 3)), 4)]
        assert deserialize_inputs("Mbpp/3", [[[1, 2]]]) == [[[1, 2]]]
        with pytest.raises(ConfigError, match="shaped"):
            deserialize_inputs("Mbpp/63", [[1, 2]])
        row = {"task_id": "Mbpp/2", "entry_point": "similar_elements",
               "prompt": '"""\nShared elements.\nassert set(similar_elements((3, 4), (4, 5))) == set((4,))\n"""\n',
               "canonical_solution": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
               "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]], [[1, 2], [3]]], "atol": 0}
        data = write_jsonl(tmp_path / "p2.jsonl", [row])
        # tuple-only code: passes only when the arguments are tuples, as EvalPlus passes them
        reply = "\ndef similar_elements(a, b):\n    hash((a, b))\n    return tuple(set(a) & set(b))\n```"
        answers = write_jsonl(tmp_path / "a2.jsonl", [{"id": "Mbpp/2", "turns": [reply]}])
        assert MBPPTask(data=str(data), sandbox=ALLOW).evaluate(ReplayEngine(answers)).quality == 1.0
        bad = write_jsonl(tmp_path / "b2.jsonl", [{"id": "Mbpp/2", "turns": [
            "\ndef similar_elements(a, b):\n    return a + (0,)\n```"]}])
        assert MBPPTask(data=str(data), sandbox=ALLOW).evaluate(ReplayEngine(bad)).quality == 0.0

    def test_evalplus_protocol_uses_its_sanitiser_on_the_same_tests(self, tmp_path) -> None:
        # a continuation of EvalPlus's opened block, and a recorded whole turn with its own block
        replies = {"Mbpp/3": "def half(x):\n  return x / 2\n```\n\nIt halves x.",
                   "Mbpp/4": "```python\ndef total(xs): return sum(xs)\n```"}
        assert [s.score for s in self._run(tmp_path, replies, "evalplus").values()] == [1.0, 1.0]
        assert [s.score for s in self._run(tmp_path, replies, "official").values()] == [0.0, 0.0]


def test_plain_protocol_reads_a_continued_block(tmp_path) -> None:
    """Under ``plain`` a reply that continues the prefilled block is sanitised as that block."""
    row = {"task_id": 1, "text": "Add one.", "code": "", "test_list": ["assert f(1) == 2"]}
    data = write_jsonl(tmp_path / "m.jsonl", [row])
    answers = write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "turns": ["\ndef f(x):\n  return x + 1\n```\n\nDone."]}])
    assert MBPPTask(data=str(data), sandbox=ALLOW, protocol="plain").evaluate(ReplayEngine(answers)).quality == 1.0
    assert MBPPTask(data=str(data), sandbox=ALLOW, protocol="official").evaluate(ReplayEngine(answers)).quality == 0.0


def test_engine_prefill_opens_the_assistant_turn(tiny_family) -> None:
    """A chat request's prefill is generated from, as if the model had written it."""
    from cycleqd.config import EngineConfig
    from cycleqd.engine.hf import HFEngine
    from cycleqd.engine.protocol import GenRequest

    engine = HFEngine.from_path(str(tiny_family["base"]), EngineConfig(device="cpu", batch_size=2))
    engine.tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    msgs = ({"role": "user", "content": "hello"},)
    with_prefill = engine.generate([GenRequest("c", messages=msgs, prefill="def", max_new_tokens=6)])[0]
    as_prompt = engine.generate([GenRequest("p", prompt="[hello]def", max_new_tokens=6)])[0]
    assert with_prefill == as_prompt


def test_mbpp_plus_rows_with_assertions(tmp_path) -> None:
    rows = [{"task_id": "Mbpp/2", "prompt": '"""\nAdd one.\nassert add1(1) == 2\n"""\n', "entry_point": "add1",
             "canonical_solution": "def add1(x):\n    return x + 1\n", "assertion": "assert add1(1) == 2\nassert add1(5) == 6"}]
    data = write_jsonl(tmp_path / "plus.jsonl", rows)
    good = write_jsonl(tmp_path / "g.jsonl", [{"id": "Mbpp/2", "turns": ["\ndef add1(x):\n    return x+1\n```"]}])
    bad = write_jsonl(tmp_path / "b.jsonl", [{"id": "Mbpp/2", "turns": ["\ndef add1(x):\n    return x\n```"]}])
    task = MBPPTask(data=str(data), sandbox=ALLOW)
    assert task.evaluate(ReplayEngine(good)).quality == 1.0
    res = task.evaluate(ReplayEngine(bad))
    assert res.quality == 0.0 and "AssertionError" in res.samples[0].error


def test_hub_mbpp_plus_rows_read_like_mbpp(tmp_path) -> None:
    """``hf://evalplus/mbppplus`` rows hold MBPP's plain text as ``prompt`` and its test_list."""
    row = {"task_id": 2, "prompt": "Write a function to add one", "code": "import math\ndef add1(x):\n  return x + 1",
           "test_imports": ["import math"], "test_list": ["assert add1(1) == 2", "assert math.isclose(add1(0.5), 1.5)"]}
    p = problem_from_row(row)
    assert (p.text, p.assertion, p.entry_point, p.setup, p.plus) == (
        "Write a function to add one", "assert add1(1) == 2", "add1", "import math", False)
    assert "Write a function to add one. Your code should satisfy" in official_prompt(p)


def test_options_are_typed(tmp_path) -> None:
    assert MBPPTask.executes_code is True
    data = str(write_jsonl(tmp_path / "p.jsonl", _plus_rows()))
    with pytest.raises(ConfigError, match="unknown option 'limt'; did you mean 'limit'"):
        MBPPTask(data=data, limt=3)  # the options are declared once, in MBPPTask.Options
    with pytest.raises(ConfigError, match="protocol"):
        MBPPTask(data=data, protocol="agentbench")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        MBPPTask(data=data, max_new_tokens=0)
    with pytest.raises(ConfigError, match="399"):  # the official set is all of MBPP+ v0.1.0
        MBPPTask(data=data, select="official")
    rows = [dict(_plus_rows()[1], task_id=f"Mbpp/{1000 + i}") for i in range(399)]
    full = str(write_jsonl(tmp_path / "plus399.jsonl", rows))
    assert len(MBPPTask(data=full, select="official").sample_ids()) == 399


def test_code_execution_needs_the_opt_in(shared_data) -> None:
    task = MBPPTask(data=str(shared_data / "mbpp/mbpp.jsonl"), sandbox=SandboxConfig(), limit=2)
    with pytest.raises(CodeExecutionNotAllowed):
        task.evaluate(ReplayEngine.__new__(ReplayEngine))


def test_hostile_completions_fail_their_sample_only(shared_data, tmp_path) -> None:
    turns = {"2": "```python\ndef similar_elements(a, b):\n    while True:\n        pass\n```",
             "3": "```python\ndef is_not_prime(n):\n    return open('/etc/shadow').read()\n```",
             "4": "```python\ndef heap_queue_largest(nums, n):\n    return bytearray(10 * 1024 ** 3)\n```",
             "5": "```python\nimport sys\ndef count_ways(n):\n    return 1\nsys.exit(0)\n```"}
    answers = write_jsonl(tmp_path / "a.jsonl", [{"id": k, "turns": [v]} for k, v in turns.items()])
    task = MBPPTask(data=str(shared_data / "mbpp/mbpp.jsonl"), sandbox=SandboxConfig(allow_code_execution=True,
                    timeout=1.5, memory_mb=256), ids=["2", "3", "4", "5"], protocol="plain")
    res = task.evaluate(ReplayEngine(answers))
    assert res.quality == 0.0
    errors = {s.id: s.error for s in res.samples}
    assert "timed out" in errors["2"]
    assert "MemoryError" in errors["4"]
    assert "PermissionError" in errors["3"] or "No such file" in errors["3"]


def test_official_oracle_on_all_974(shared_data, tmp_path) -> None:
    """Reference solutions written as a model writes them pass; a None-returning stub never does."""
    data = str(shared_data / "mbpp/mbpp.jsonl")
    good, bad = mbpp_official_answers(shared_data / "mbpp/mbpp.jsonl", tmp_path)
    res = score("mbpp", data, answers=str(good), options={"protocol": "official"})
    print(f"MBPP official oracle: {res.quality:.4f} of {res.n}; failed: "
          + json.dumps({s.id: s.error for s in res.samples if s.score < 1}))
    assert res.n == 974 and res.quality >= 0.99
    assert score("mbpp", data, answers=str(bad), options={"protocol": "official"}).quality <= 0.01


def test_plain_default_scores_raw_references_on_all_974(shared_data, tmp_path) -> None:
    """The original MBPP file defaults to ``plain``: raw references in any indentation pass; the
    official sanitiser rejects the 2-space / tab ones."""
    good, _ = mbpp_answers(shared_data / "mbpp/mbpp.jsonl", tmp_path)
    data = str(shared_data / "mbpp/mbpp.jsonl")
    res = score("mbpp", data, answers=str(good), ids=None)
    assert res.n == 974 and res.quality >= 0.97
    assert score("mbpp", data, answers=str(good), options={"protocol": "official"}).quality < 0.7
