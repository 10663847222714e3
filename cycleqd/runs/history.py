"""The models a run's archives are rebuilt from: seed experts and children, with their growths applied.

A run's archives are a pure function of its log. The log is ``seeds.json``,
``children.jsonl`` and, for a grown run, ``growth.jsonl``: one line per task
added by ``cycleqd grow``, holding the new task's score of every model scored
when it was added. A model enters the rebuild with its logged scores plus those
growth scores, in log order, if it has a score on every current task.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from cycleqd.runs.layout import GROWTH_LOG  # noqa: F401 (the growth log's name, for readers of this module)

#: One model offered to the archives: (genome id, scores per task, generation).
Offer = tuple[str, dict[str, float], int]


def replay_models(
    tasks: Sequence[str],
    seeds: Mapping[str, Mapping],
    children: Iterable[Any],
    growths: Iterable[Mapping] = (),
) -> list[Offer]:
    """The ``(genome, scores, generation)`` offers that rebuild the archives, in the order the run made them.

    Args:
        tasks: the run's current tasks.
        seeds: ``seeds.json`` ({task: {"genome": id, "scores": {...}}}), offered first at generation 0.
        children: the :class:`~cycleqd.search.child.ChildRecord` records of ``children.jsonl``, in order; failed ones are left out.
        growths: ``growth.jsonl`` records ({"task": name, "scores": {genome id: score}, ...}).

    Models without a score on every task (children that were not elites when a task
    was added, so were never scored on it) are left out: they are in no archive.
    """
    extra: dict[str, dict[str, float]] = {}
    for g in growths:
        for gid, score in g["scores"].items():
            extra.setdefault(gid, {})[g["task"]] = float(score)
    models = [(s["genome"], {**extra.get(s["genome"], {}), **s["scores"]}, 0) for s in seeds.values()]
    models += [(c.id, {**extra.get(c.id, {}), **c.scores}, int(c.generation)) for c in children if c.ok]
    return [(g, {t: float(sc[t]) for t in tasks}, gen) for g, sc, gen in models if all(t in sc for t in tasks)]


def run_history(store) -> list[Offer]:
    """:func:`replay_models` over a run folder (a :class:`cycleqd.runs.store.RunStore`)."""
    return replay_models(store.config().task_names, store.seeds(), store.children(), store.growths())
