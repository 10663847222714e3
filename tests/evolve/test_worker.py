"""The worker on the mini tasks: checks that run beside the next task's generation give the same scores."""
from __future__ import annotations

from pathlib import Path

import pytest

from cycleqd.config import parse_config
from cycleqd.evolve.worker import ChildWorker
from cycleqd.model.genome import Genome

SKILLS = ("sql", "code", "shell")  # SQL first in the config; its check runs in process, so it goes last


@pytest.fixture(scope="module")
def worker(tmp_path_factory, small_world: Path) -> ChildWorker:
    """A worker over the small mini world (trained models: scores that differ) and 20 val items per task."""
    cfg = {"name": "w", "seed": 0, "sandbox": {"allow_code_execution": True},
           "tasks": [{"name": k, "kind": f"mini_{k}", "options": {"split": "val", "n": 20}} for k in SKILLS],
           "models": {"base": str(small_world / "base"), "experts": {k: str(small_world / f"expert_{k}") for k in SKILLS}},
           "evolution": {"generations": 1, "workers": 1}, "engine": {"device": "cpu", "batch_size": 64},
           "prepare_cache": str(tmp_path_factory.mktemp("cache"))}
    return ChildWorker(parse_config(cfg), threads=1)


def test_scores_are_each_tasks_own_evaluate(worker):
    seen = []
    for k in range(3):
        scores, seconds = worker.evaluate(Genome.seed(k, worker.factors))
        alone = {name: task.evaluate(worker.engine).quality for name, task in worker.tasks.items()}
        assert scores == alone
        assert list(scores) == list(SKILLS)  # the config's order, whatever order they ran in
        assert set(seconds) == {"materialize", *(f"eval_{k}" for k in SKILLS)}
        seen.append(tuple(scores.values()))
    assert len(set(seen)) == 3 and max(map(max, seen)) > 0  # the experts differ: the check is not vacuous


def test_only_some_tasks(worker):
    scores, seconds = worker.evaluate(Genome.base(worker.factors), tasks=["code"])
    assert list(scores) == ["code"] and "eval_sql" not in seconds
