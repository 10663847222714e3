"""Replay answer files built from the data's own solutions, as the external oracle check builds them."""
from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mbpp_answers(data: Path, out: Path) -> tuple[Path, Path]:
    """(good, bad): reference ``code`` in a ```python block; a stub that cannot pass."""
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    good = [{"id": r["task_id"], "turns": ["```python\n" + r["code"] + "\n```"]} for r in rows]
    bad = [{"id": r["task_id"], "turns": ["```python\ndef f():\n    pass\n```"]} for r in rows]
    return write_jsonl(out / "mbpp_good.jsonl", good), write_jsonl(out / "mbpp_bad.jsonl", bad)


def mbpp_official_answers(data: Path, out: Path) -> tuple[Path, Path]:
    """(good, bad) replies as a model writes them after the official prefilled python fence.

    Good: the reference solution in the 4-space layout models write (``ast.unparse``), the
    closing fence and a line of prose. Bad: a well-formed entry point that returns ``None``.
    """
    from cycleqd.tasks.mbpp import entry_point_of

    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    good, bad = [], []
    for r in rows:
        with warnings.catch_warnings():  # reference code has invalid escape sequences
            warnings.simplefilter("ignore")
            code = ast.unparse(ast.parse(r["code"]))
        entry = entry_point_of(r["test_list"][0], r["code"])
        good.append({"id": r["task_id"], "turns": ["\n" + code + "\n```\n\nThis solves the problem."]})
        bad.append({"id": r["task_id"], "turns": [f"\ndef {entry}(*args, **kwargs):\n    return None\n```"]})
    return write_jsonl(out / "mbpp_official_good.jsonl", good), write_jsonl(out / "mbpp_official_bad.jsonl", bad)


def dbbench_answers(data: Path, out: Path) -> tuple[Path, Path]:
    """(good, bad): gold label as the answer, or the label statement then an answer turn."""
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    good, bad = [], []
    for i, r in enumerate(rows):
        if r["type"][0] in ("INSERT", "DELETE", "UPDATE"):
            good.append({"id": i, "turns": ["Action: Operation\n```sql\n" + r["label"][0] + "\n```",
                                            "Action: Answer\nFinal Answer: [\"none\"]"]})
        else:
            good.append({"id": i, "turns": ["Action: Answer\nFinal Answer: " + json.dumps(r["label"])]})
        bad.append({"id": i, "turns": ["Action: Answer\nFinal Answer: [\"certainly wrong 1234\"]"]})
    return write_jsonl(out / "db_good.jsonl", good), write_jsonl(out / "db_bad.jsonl", bad)
