"""Trajectories for the next expert: the successful conversations of a run's elites, as JSONL.

With ``evolution.record_episodes: true`` every child that enters an archive (and every
seed expert) leaves its passing samples' conversations in ``RUN/episodes/<genome>.jsonl``
(:func:`episodes_of`: multi-turn DB and OS episodes, MBPP solutions, mini answers).
:func:`harvest` turns those of the current elites into one JSONL in the ShareGPT form
that AgentBank and fine-tuning tools read::

    {"id": "code-17-g000042", "task": "code", "kind": "mini_code", "sample_id": "17",
     "model": "g000042", "score": 1.0, "elite": {"scores": {...}, "cells": {"sql": [3, 4]}},
     "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}

Roles map ``system`` -> ``system``, ``user`` -> ``human``, ``assistant`` -> ``gpt``. By
default each (task, sample) appears once, from the elite with the best quality on that
task; ``every_elite`` keeps one line per elite that solved it. Elites without a recording
(a run evolved without ``record_episodes``) are evaluated again on the run's own items (greedy
decoding: the conversations a recording would have kept), unless ``regenerate`` is False.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

from cycleqd.config import ConfigError
from cycleqd.tasks.protocol import episodes_of

__all__ = ["ROLES", "episodes_of", "to_sharegpt", "harvest"]

ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def to_sharegpt(conversation: Sequence[dict]) -> list[dict[str, str]]:
    """Chat messages as ShareGPT turns (``from`` / ``value``)."""
    return [{"from": ROLES.get(m["role"], m["role"]), "value": m["content"]} for m in conversation]


def _regenerated(run: Any, genomes: Sequence[str], tasks: Sequence[str] | None, split: str | None, n: int | None,
                 seed: int | None, progress: bool) -> dict[str, list[dict]]:
    from tqdm.auto import tqdm

    from cycleqd.evolve.worker import local_worker

    worker = local_worker(run.config, split=split, n=n, seed=seed)
    out = {}
    for g in tqdm(genomes, desc="regenerate", disable=not progress, leave=False):
        out[g] = worker.evaluate_recorded(run.store.load_genome(g), tasks, record=True)[2]
    return out


def harvest(run_dir: str | Path, out: str | Path, *, regenerate: bool | None = None, every_elite: bool = False,
            tasks: Sequence[str] | None = None, top: int | None = None, split: str | None = None,
            n: int | None = None, seed: int | None = None, progress: bool = True) -> dict:
    """Write the current elites' passing conversations to ``out`` (JSONL, ShareGPT form).

    ``regenerate``: None (default) evaluates the elites without a recording again, on the run's
    own items; False uses recordings only; True as None, and with ``split`` / ``n`` / ``seed`` all
    elites are asked about those items instead. ``tasks`` keeps only those tasks' conversations
    (and regenerates only those); ``top`` only the ``top`` best elites of each kept task's archive
    (by that task's quality).

    Returns ``{"lines", "per_task": {task: lines}, "elites", "recorded", "regenerated"}``.

    Raises:
        ConfigError: no run; no elite has a recording and ``regenerate`` is False; ``split`` /
            ``n`` / ``seed`` with ``regenerate`` False; an unknown task.
    """
    from cycleqd.atomic import write_atomic
    from cycleqd.runs.folder import RunFolder, best_by_mean

    other_items = split is not None or n is not None or seed is not None
    if other_items and regenerate is False:
        raise ConfigError("--split, --n and --draw-seed choose the items the elites are asked about again; "
                          "drop --recorded-only")
    run = RunFolder(run_dir)
    unknown = [t for t in tasks or [] if t not in run.tasks]
    if unknown:
        raise ConfigError(f"--tasks: {', '.join(unknown)} not among the run's tasks ({', '.join(run.tasks)})")
    if top is not None and top < 1:
        raise ConfigError(f"--top must be >= 1, got {top}")
    snap = run.snapshot()
    elites = best_by_mean(snap)
    if top is not None:
        keep = {e["genome"] for t in (tasks or snap.tasks)
                for e in sorted(snap.archives[t]["elites"], key=lambda e: (-e["quality"], e["genome"]))[:top]}
        elites = [e for e in elites if e["genome"] in keep]
    cells: dict[str, dict[str, list[int]]] = {}
    for t in snap.tasks:
        for e in snap.archives[t]["elites"]:
            cells.setdefault(e["genome"], {})[t] = list(e["cell"])
    recorded = {e["genome"]: run.store.episodes(e["genome"]) for e in elites}
    missing = [g for g, eps in recorded.items() if eps is None]
    todo: list[str] = []
    if regenerate is not False:
        # the recorded items are the run's own draw; other items are asked for by split / n / seed
        todo = [e["genome"] for e in elites] if other_items else missing
        if todo:
            if progress:
                print(f"evaluating {len(todo)} of {len(elites)} elites again ("
                      f"{'on other items' if other_items else 'no recorded episodes'})", file=sys.stderr, flush=True)
            recorded.update(_regenerated(run, todo, tasks, split, n, seed, progress))
    elif len(missing) == len(elites):
        raise ConfigError(f"run {str(run_dir)!r} recorded no episodes (evolve with evolution.record_episodes: true), "
                          "and --recorded-only keeps the elites from being evaluated again")
    lines: dict[tuple, dict] = {}
    for e in elites:  # best mean first: ties below go to the better elite overall
        for ep in recorded.get(e["genome"]) or []:
            if tasks is not None and ep["task"] not in tasks:
                continue
            key = (ep["task"], ep["id"]) if not every_elite else (ep["task"], ep["id"], e["genome"])
            quality = float(e["scores"].get(ep["task"], 0.0))
            if key in lines and lines[key]["_quality"] >= quality:
                continue
            lines[key] = {"id": f"{ep['task']}-{ep['id']}-{e['genome']}", "task": ep["task"], "kind": ep["kind"],
                          "sample_id": ep["id"], "model": e["genome"], "score": ep["score"],
                          "elite": {"scores": e["scores"], "cells": cells.get(e["genome"], {})},
                          "conversations": to_sharegpt(ep["conversation"]), "_quality": quality}
    rows = sorted(lines.values(), key=lambda r: (r["task"], _num(r["sample_id"]), r["model"]))
    text = "".join(json.dumps({k: v for k, v in r.items() if k != "_quality"}) + "\n" for r in rows)
    write_atomic(Path(out), text)
    per_task: dict[str, int] = {}
    for r in rows:
        per_task[r["task"]] = per_task.get(r["task"], 0) + 1
    return {"lines": len(rows), "per_task": per_task, "elites": len(elites),
            "recorded": len(elites) - len(missing), "regenerated": len(todo),
            "bytes": len(text.encode())}


def _num(sample_id: str) -> tuple:
    return (0, int(sample_id), "") if sample_id.isdigit() else (1, 0, sample_id)
