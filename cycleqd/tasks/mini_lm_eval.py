"""The mini world's skills as lm-evaluation-harness task YAMLs over local JSON files.

:func:`write_mini_lm_eval` writes, for each mini skill, ``mini_<skill>.yaml`` (``dataset_path:
json``), its ``validation`` and ``test`` items as JSON lines and a ``utils.py`` whose
``process_results`` is :func:`process_results` here: it checks an answer with the native mini
task's own checker (the same sandbox jobs), so an item scores the same through ``kind:
lm_eval`` as through ``kind: mini_<skill>``. ``experiments/lm_eval/mini`` holds the files
written with the defaults: ``write_mini_lm_eval("experiments/lm_eval/mini")`` writes them again.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from cycleqd.config import SandboxConfig
from cycleqd.mini.items import MiniItem
from cycleqd.mini.skills import SKILLS, skill_items
from cycleqd.registry import TASKS

_YAML = """\
# The mini world's {skill} skill as an lm-eval task over local JSON lines (written by
# cycleqd.tasks.mini_lm_eval.write_mini_lm_eval): the prompt is the context, the answer is
# the first generated line, and process_results runs the native mini_{skill} check.
task: mini_{skill}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: data/{skill}_val.jsonl
    test: data/{skill}_test.jsonl
output_type: generate_until
validation_split: validation
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 80
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_UTILS = '''"""process_results of the mini lm-eval tasks: the native mini task's check (see cycleqd.tasks.mini_lm_eval)."""
from cycleqd.tasks.mini_lm_eval import process_results  # noqa: F401
'''

_checkers: dict[str, Any] = {}
_lock = threading.Lock()


def _checker(skill: str) -> Any:
    """One native mini task per skill, used only for its checker (and its caches)."""
    with _lock:
        if skill not in _checkers:
            box = SandboxConfig(allow_code_execution=True, timeout=5, memory_mb=512)
            _checkers[skill] = TASKS.get(f"mini_{skill}")(name=f"lm_eval_{skill}", sandbox=box, n=1)
        return _checkers[skill]


def doc_of(item: MiniItem, skill: str, split: str) -> dict:
    """An item as one JSON line (``context`` as a JSON string, so every row has one schema)."""
    return {"id": item.id, "skill": skill, "split": split, "family": item.family, "prompt": item.prompt,
            "answer": item.answer, "context": json.dumps(item.context)}


def process_results(doc: dict, results: list) -> dict[str, float]:
    """lm-eval's per-document hook: ``acc`` is 1.0 when the native mini check passes the first answer line."""
    item = MiniItem(id=f"{doc['split']}/{doc['id']}", family=doc["family"], prompt=doc["prompt"],
                    answer=doc["answer"], context=json.loads(doc["context"]))
    out = results[0] if results else ""
    return {"acc": float(_checker(doc["skill"]).score_outputs([item], [out])[0].score)}


def process_results_batch(docs: list[dict], results: list[list]) -> list[dict[str, float]]:
    """:func:`process_results` of many documents at once: one sandbox batch per skill (lm-eval
    calls the per-document hook; cycleqd's ``kind: lm_eval`` calls this when the hook has it as ``batched``)."""
    out: list[dict[str, float] | None] = [None] * len(docs)
    by_skill: dict[str, list[int]] = {}
    for k, d in enumerate(docs):
        by_skill.setdefault(d["skill"], []).append(k)
    for skill, ks in by_skill.items():
        items = [MiniItem(id=f"{docs[k]['split']}/{docs[k]['id']}", family=docs[k]["family"], prompt=docs[k]["prompt"],
                          answer=docs[k]["answer"], context=json.loads(docs[k]["context"])) for k in ks]
        outs = [results[k][0] if results[k] else "" for k in ks]
        for k, s in zip(ks, _checker(skill).score_outputs(items, outs)):
            out[k] = {"acc": float(s.score)}
    return out  # type: ignore[return-value]


process_results.batched = process_results_batch  # type: ignore[attr-defined]


def write_mini_lm_eval(out: str | Path, n: int = 100, seed: int = 0) -> Path:
    """Write the mini lm-eval tasks into ``out``: YAMLs, ``utils.py`` and ``n`` val and test items per
    skill, drawn as ``kind: mini_<skill>`` with ``n`` and ``seed`` draws them (same ids, same order)."""
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for skill in SKILLS:
        (out / f"mini_{skill}.yaml").write_text(_YAML.format(skill=skill))
        for split in ("val", "test"):
            rows = [json.dumps(doc_of(it, skill, split)) for it in skill_items(skill, split, n, seed)]
            (out / "data" / f"{skill}_{split}.jsonl").write_text("\n".join(rows) + "\n")
    (out / "utils.py").write_text(_UTILS)
    return out
