"""Replay answer files built from the data's own solutions, as the external oracle check builds them."""
from __future__ import annotations

import json
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
