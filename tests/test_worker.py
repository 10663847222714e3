"""The worker on the mini tasks: checks that run beside the next task's generation give the same scores."""
from __future__ import annotations

import pytest

from pathlib import Path

from cycleqd.config import parse_config
from cycleqd.genome import Genome
from cycleqd.worker import ChildWorker

MINI = Path(__file__).resolve().parents[1] / ".cache" / "mini"


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> ChildWorker:
    """A worker over the default mini world (trained models: scores that differ) and 20 val items per task."""
    if not (MINI / "manifest.json").is_file():
        pytest.skip("the default mini world is not built")
    world = MINI
    tasks = [{"name": k, "kind": f"mini_{k}", "options": {"split": "val", "n": 20}} for k in ("sql", "code", "shell")]
    cfg = {"name": "w", "seed": 0, "tasks": tasks, "sandbox": {"allow_code_execution": True},
           "models": {"base": str(world / "base"), "experts": {k: str(world / f"expert_{k}") for k in ("sql", "code", "shell")}},
           "evolution": {"generations": 1, "workers": 1}, "engine": {"device": "cpu", "batch_size": 64},
           "prepare_cache": str(tmp_path_factory.mktemp("cache"))}
    return ChildWorker(parse_config(cfg), threads=1)


def test_scores_are_each_tasks_own_evaluate(worker):
    for k in range(3):
        genome = Genome.seed(k, worker.factors)
        scores, seconds = worker.evaluate(genome)
        alone = {name: task.evaluate(worker.engine).quality for name, task in worker.tasks.items()}
        assert scores == alone
        assert list(scores) == ["sql", "code", "shell"]  # the config's order, whatever order they ran in
        assert set(seconds) == {"materialize", "eval_sql", "eval_code", "eval_shell"}
    assert len(set(map(tuple, (worker.evaluate(Genome.seed(k, worker.factors))[0].values() for k in range(3))))) > 1


def test_only_some_tasks(worker):
    scores, seconds = worker.evaluate(Genome.base(worker.factors), tasks=["code"])
    assert list(scores) == ["code"] and "eval_sql" not in seconds
