"""RunFolder: the one read model of a run folder.

Open a folder, take a snapshot of its archives (now or at generation N, replayed
from the seeds and the log), walk a genome's lineage, rank elites by their mean
score, summarise the run. ``show``, ``heatmap``, ``report``, ``export``, ``check``
and the table are views of it. A generation is one finished child (see
:mod:`cycleqd.search.child`).

The archives are a pure function of seeds.json and children.jsonl, so
archives.json is only a cache: when it is missing, unreadable or behind the log
it is rebuilt here (and :meth:`RunFolder.rebuild_archives` writes it back).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cycleqd.atomic import write_atomic
from cycleqd.config import Bins, Config, ConfigError
from cycleqd.runs import layout
from cycleqd.runs.store import RunNotFound, RunStore
from cycleqd.search.archive import Archive, Elite
from cycleqd.search.child import ChildRecord

__all__ = ["ArchiveSnapshot", "RunFolder", "MAX_LINEAGE_DEPTH", "best_by_mean", "lineage"]

MAX_LINEAGE_DEPTH = 8
SEED_PREFIX = "seed_"  # seed experts' genome ids


@dataclass(frozen=True)
class ArchiveSnapshot:
    """The K archives at one generation, in the archives.json schema.

    ``archives[task]`` holds coverage, qd_score, best and ``elites``: dicts with
    cell, quality, scores, genome, generation (``elites(task)`` gives them as
    :class:`~cycleqd.search.archive.Elite`). ``seeds`` maps a seed expert's genome id to its scores.
    """

    generation: int
    tasks: list[str]
    bins: dict[str, Bins]
    archives: dict[str, dict[str, Any]]
    seeds: dict[str, dict[str, float]]
    archive: dict[str, Any] = field(default_factory=lambda: {"kind": "grid"})  # kind; a CVT's centroids

    def other_tasks(self, task: str) -> list[str]:
        """The tasks that are the axes of ``task``'s archive, in task order."""
        return [t for t in self.tasks if t != task]

    def elites(self, task: str) -> list[Elite]:
        """The elites of archive ``task`` as typed records."""
        return [Elite(task, tuple(e["cell"]), float(e["quality"]), dict(e["scores"]), e["genome"],
                      int(e["generation"])) for e in self.archives[task]["elites"]]

    def grid(self, task: str) -> np.ndarray:
        """Quality grid of one archive, NaN where empty; shape = bin counts of the other tasks."""
        g = np.full(tuple(self.bins[o].count for o in self.other_tasks(task)), np.nan)
        for e in self.archives[task]["elites"]:
            g[tuple(e["cell"])] = e["quality"]
        return g

    def to_json(self) -> dict:
        """The ``show --json`` object (DESIGN.md section 7), with the bins."""
        return {"generation": self.generation, "tasks": list(self.tasks),
                "bins": {t: b.model_dump() for t, b in self.bins.items()}, "archives": self.archives}


def best_by_mean(snap: ArchiveSnapshot) -> list[dict]:
    """Every distinct elite of all archives, best mean score over the tasks first.

    Each dict is an elite plus ``mean`` and ``archives`` (the tasks whose archive holds it).
    """
    seen: dict[str, dict] = {}
    for task in snap.tasks:
        for e in snap.archives[task]["elites"]:
            rec = seen.setdefault(e["genome"], {**e, "archives": []})
            rec["archives"].append(task)
    out = []
    for rec in seen.values():
        scores = [rec["scores"].get(t) for t in snap.tasks]
        if any(s is None for s in scores):
            continue
        out.append({**rec, "mean": sum(scores) / len(scores)})
    return sorted(out, key=lambda r: (-r["mean"], r["genome"]))


def lineage(genome: str, parents: dict[str, list[str]], max_depth: int = MAX_LINEAGE_DEPTH) -> dict:
    """Ancestry of ``genome`` as a nested dict {"id", "parents": [...], "repeat", "cut"}.

    A genome met again (lineages are DAGs: two parents often share ancestors) is
    marked ``repeat`` instead of expanded; below ``max_depth`` the tree is ``cut``.
    """
    seen: set[str] = set()

    def walk(g: str, depth: int) -> dict:
        node = {"id": g, "parents": [], "repeat": g in seen, "cut": False}
        if node["repeat"]:
            return node
        seen.add(g)
        ps = parents.get(g, [])
        if ps and depth >= max_depth:
            node["cut"] = True
            return node
        node["parents"] = [walk(p, depth + 1) for p in ps]
        return node

    return walk(genome, 0)


class RunFolder:
    """A run folder, read.

    Args:
        path: the run folder. Raises RunNotFound (bad input) if it holds no run.

    Files are read once and cached; open a new RunFolder to see later changes.
    Damaged files raise :class:`~cycleqd.runs.store.RunDamaged` naming the file (and line).
    """

    def __init__(self, path: str | Path | RunStore):
        self.store = path if isinstance(path, RunStore) else RunStore(path)
        self.path = self.store.path

    @classmethod
    def open(cls, path: str | Path) -> "RunFolder":
        """The run folder at ``path`` (RunNotFound if there is none)."""
        return cls(path)

    @cached_property
    def config(self) -> Config:
        return self.store.config()

    @property
    def tasks(self) -> list[str]:
        return self.config.task_names

    @cached_property
    def bins(self) -> dict[str, Bins]:
        return {t.name: t.bins for t in self.config.tasks}

    @cached_property
    def children(self) -> list[ChildRecord]:
        """children.jsonl as typed records, in log order."""
        return self.store.children()

    @cached_property
    def seeds(self) -> dict[str, dict]:
        """seeds.json: {task: {"genome": id, "scores": {...}}}."""
        return self.store.seeds()

    @property
    def generation(self) -> int:
        """Finished children (the run's current generation)."""
        return len(self.children)

    @cached_property
    def parents(self) -> dict[str, list[str]]:
        """Genome id -> its parents' ids, for every logged child."""
        return {c.id: list(c.parents) for c in self.children}

    def history(self, generation: int | None = None) -> list[tuple[str, dict[str, float], int]]:
        """(genome, scores, generation) in the order the run offered them, up to ``generation``.

        A grown run's earlier models gain their new tasks' scores from its growth log.
        """
        from cycleqd.runs.history import replay_models

        n = self.generation if generation is None else generation
        return replay_models(self.tasks, self.seeds, self.children[:n], self.store.growths())

    def archive(self, generation: int | None = None) -> Archive:
        """The archives at ``generation`` (default now), replayed from the seeds and the log."""
        return Archive.replay(self.tasks, self.bins, self.history(generation), self.config.archive)

    def archive_if_grown(self, cfg: Config, seeds: dict[str, dict], growth: dict) -> Archive:
        """The archives a resume would replay once ``growth`` (a growth-log record) is added
        under the grown ``cfg`` and ``seeds``: what ``cycleqd grow`` stages."""
        from cycleqd.runs.history import replay_models

        models = replay_models(cfg.task_names, seeds, self.children, [*self.store.growths(), growth])
        return Archive.replay(cfg.task_names, {t.name: t.bins for t in cfg.tasks}, models, cfg.archive)

    def stale(self) -> str | None:
        """Why archives.json cannot be used as it is (None if it matches the seeds and the log)."""
        if not self.seeds:
            return None
        data = self.store.archives()
        if data is None:
            return "missing or unreadable"
        if int(data.get("generation", -1)) != self.generation:
            return f"at generation {data.get('generation')}, the log at {self.generation}"
        if list(data.get("tasks", [])) != self.tasks:
            return "tasks differ from the config"
        return None

    def snapshot(self, generation: int | None = None) -> ArchiveSnapshot:
        """The archives now (``None``) or as they were after ``generation`` children.

        archives.json is used when it matches the log; otherwise (and for an earlier
        generation) the archives are replayed. Raises ConfigError for a generation out
        of range, RunNotFound when the run has not evaluated its seed experts yet.
        """
        if not self.seeds and self.children:
            raise RunNotFound(f"{self.path / RunStore.SEEDS}: missing while children.jsonl holds "
                              f"{self.generation} children; `cycleqd resume {self.path}` evaluates the seed "
                              "experts again and rebuilds the archives")
        if not self.seeds:
            raise RunNotFound(f"run folder {str(self.path)!r} has no archives yet "
                              "(the run has not evaluated its seed experts)")
        seeds = {s["genome"]: dict(s["scores"]) for s in self.seeds.values()}
        if generation is None:
            data = self.store.archives() if self.stale() is None else None
            if data is not None:
                return ArchiveSnapshot(self.generation, self.tasks, self.bins, data["archives"], seeds,
                                       data.get("archive") or {"kind": "grid"})
            generation = self.generation
        if not 0 <= generation <= self.generation:
            raise ConfigError(f"--generation must be between 0 and {self.generation}, got {generation}")
        replayed = self.archive(generation).to_json(generation)
        return ArchiveSnapshot(generation, self.tasks, self.bins, replayed["archives"], seeds, replayed["archive"])

    def rebuild_archives(self) -> str | None:
        """Write archives.json again from the seeds and the log if it is stale; returns why (or None)."""
        why = self.stale()
        if why is not None:
            self.store.write_archives(self.archive().to_json(self.generation))
        return why

    def lineage(self, genome: str, max_depth: int = MAX_LINEAGE_DEPTH) -> dict:
        """Ancestry tree of ``genome`` (see :func:`lineage`)."""
        return lineage(genome, self.parents, max_depth)

    def best_by_mean(self, generation: int | None = None) -> list[dict]:
        """Distinct elites, best mean first (see :func:`best_by_mean`)."""
        return best_by_mean(self.snapshot(generation))

    def final_merge(self) -> dict | None:
        return self.store.final_merge()

    def front(self, generation: int | None = None) -> list[dict]:
        """The Pareto front of the children finished by ``generation`` (default all): those no other
        child beats on every task, as {"genome", "scores", "generation"} in log order. NSGA-II's
        archive (``evolution.search: nsga2``); a pure function of the log for any run."""
        from cycleqd.search.front import pareto_front

        done = [c for c in self.children[:generation] if c.ok]
        keep = set(pareto_front({c.id: c.scores for c in done}, self.tasks))
        return [{"genome": c.id, "scores": dict(c.scores), "generation": c.generation} for c in done if c.id in keep]

    def truncation(self) -> dict:
        """How often answers stopped at ``max_new_tokens``: per task the mean and largest share over the
        seed experts and children, and how many passed ``evolution.truncation_warning``; per genome its shares.

        Tasks whose engine cannot tell (recorded answers) and runs older than the record have none.
        """
        shares: dict[str, dict[str, float]] = {s["genome"]: dict(s.get("truncated") or {})
                                               for s in self.seeds.values()}
        shares.update({c.id: dict(c.truncated) for c in self.children if c.ok})
        threshold = self.config.evolution.truncation_warning
        tasks = {}
        for t in self.tasks:
            vals = [g[t] for g in shares.values() if t in g]
            if vals:
                tasks[t] = {"mean": float(np.mean(vals)), "max": float(max(vals)), "models": len(vals),
                            "over_threshold": sum(v > threshold for v in vals)}
        return {"threshold": threshold, "tasks": tasks, "genomes": {g: s for g, s in shares.items() if s}}

    def summary(self) -> dict:
        """The run at a glance: per-archive stats, the best-mean elite, the seed experts, the final merge."""
        snap = self.snapshot()
        tasks = snap.tasks
        mean = lambda s: float(np.mean([s[t] for t in tasks]))  # noqa: E731
        ranked = best_by_mean(snap)
        best = ranked[0] if ranked else None
        return {
            "generation": snap.generation,
            "archives": {t: {k: snap.archives[t][k] for k in ("coverage", "qd_score", "best")} for t in tasks},
            "experts": {t: {**s["scores"], "mean": mean(s["scores"])} for t, s in self.seeds.items()},
            "best_mean": None if best is None else {"genome": best["genome"], **best["scores"],
                                                    "mean": best["mean"]},
            "final_merge": self.final_merge(),
        }

    def write_summary(self) -> dict:
        """:meth:`summary`, also written to RUN/summary.json."""
        import json

        out = self.summary()
        write_atomic(self.path / layout.SUMMARY, json.dumps(out, indent=1))
        return out
