"""The paper's table in miniature: `make table` -> experiments/results/mini_table.json.

Rows, all scored on a test draw (never used for any choice):
base, expert_<task>, task_arithmetic and ties (mergekit, merge weight chosen on
val), cycleqd_best (the archive model with the best mean on val items evolution
never scored), cycleqd_merged (the final merge), teams of each CycleQD run's elites
(team_router: the best elite of each task's archive answers that task; team_router_nll:
the prompt's lowest-NLL member of those answers; team_vote and team_moa: the 3 best of
each archive vote by execution result / propose to an aggregator; members chosen on the
run's own scores, see :mod:`cycleqd.studies.team`), and the ablations fixed_axes,
gaussian_mutation and uniform_sampling, each CycleQD variant over several seeds.
The JSON holds a paired bootstrap 95% interval of cycleqd_best - task_arithmetic.

The table is made in two steps with one home each:

- :func:`choose_models` evolves (or resumes) the runs, ordinary run folders under
  archives/table/, and makes every choice on val; it writes the chosen models to a
  models folder (experiments/results/mini_table_models/): each seed's genomes, the
  merge weights and the world's fingerprints.
- :func:`score_models` scores that folder on a test draw (``test_seed``, ``test_n``
  items per task). ``make table-rescore TEST_SEED=S`` runs only this step, on a
  fresh draw, and refuses a world other than the one the genomes were made on.
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from cycleqd.config import Config, ConfigError, edit_config, parse_config, resolve_paths, split_config
from cycleqd.evolve.worker import ChildWorker, ready_config
from cycleqd.runs import layout

VARIANTS: dict[str, dict[str, Any]] = {
    "cycleqd": {},
    "fixed_axes": {"fixed_quality_task": "__first__"},
    "gaussian_mutation": {"mutation": {"name": "gaussian"}},
    "uniform_sampling": {"sampling": {"name": "uniform"}},
    # the other evolutionary mergers in the same genome space, at the same budget (docs/searches.md)
    "cma_es": {"search": {"name": "cma_es"}},
    "nsga2": {"search": {"name": "nsga2"}},
    "random": {"search": {"name": "random"}},
}
#: the variants that are another search, not a CycleQD ablation: their row is ``<search>_best``
SEARCH_VARIANTS = ("cma_es", "nsga2", "random")
MERGE_WEIGHTS = [0.3, 0.4, 0.5, 0.6, 0.8]
TIES_DENSITY = 0.5
MODELS_FILE = "models.json"
TEAM_SIZE = 3
#: team variant -> its row in the table
TEAM_ROWS = {"router_task": "team_router", "router_nll": "team_router_nll", "vote": "team_vote", "moa": "team_moa"}
INTERVAL_KEY = "cycleqd_best_minus_task_arithmetic"
#: the other evolved rows minus task arithmetic, paired the same way
VERSUS_KEY = "minus_task_arithmetic"
#: the other searches' best rows minus cycleqd_best, paired the same way (seeds averaged per item on both sides)
VERSUS_CYCLEQD_KEY = "minus_cycleqd_best"
#: test items per task: enough for paired intervals of about +-0.012 (300 gave about +-0.025)
TEST_N = 1500


def selection_config(evolve_cfg: Config, n: int) -> Config:
    """``n`` val items per task that the evolution never saw: the same draw, past its items.

    Choosing which elite is "best" on the items evolution optimised would favour the
    elites that were lucky on them, so choices are made on the next ``n`` items of the
    evolution's own draw (``skip`` = the evolution's ``n``).
    """
    def edit(data: dict) -> None:
        for t in data["tasks"]:
            opts = t["options"]
            if "n" not in opts:
                raise ConfigError(f"task {t['name']}: the table needs options.n (items scored during evolution)")
            t["options"] = {**opts, "skip": int(opts.get("skip", 0)) + int(opts["n"]), "n": n}

    return edit_config(evolve_cfg, edit)


def variant_config(cfg: Config, variant: str, seed: int, generations: int | None,
                   evolve_n: int | None = None) -> Config:
    def edit(data: dict) -> None:
        data["seed"] = seed
        data["name"] = f"{cfg.name}-{variant}"
        evo = data["evolution"]
        for key, value in VARIANTS[variant].items():
            if value == "__first__":
                value = cfg.task_names[0]
            evo[key] = {**evo[key], **value} if isinstance(value, dict) else value
        if generations is not None:
            evo["generations"] = generations

    return edit_config(split_config(cfg, "val", evolve_n), edit)


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """'path: old -> new' for every leaf where two config dumps differ."""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        a, b = dict(enumerate(a)), dict(enumerate(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{path}.{k}".lstrip("."))]
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def check_same_experiment(stored: Config, wanted: Config, run: Path) -> None:
    """A table run folder is resumed only if it holds the same experiment (generations aside).

    Raises:
        ConfigError: the folder was made with other settings (e.g. the YAML changed since).
    """
    a, b = resolve_paths(stored).model_dump(mode="json"), resolve_paths(wanted).model_dump(mode="json")
    a["evolution"]["generations"] = b["evolution"]["generations"]
    diff = _differences(a, b)
    if diff:
        raise ConfigError(f"{run} was made with other settings ({'; '.join(diff[:3])}); "
                          "remove it or pass --runs-root to make the table in a new folder")


class Scorer:
    """One resident model and the tasks of a split; scores genomes or plain state dicts.

    Both return {task: per-item scores (0/1), in the task's item order}.
    """

    def __init__(self, cfg: Config):
        self.worker = ChildWorker(cfg, threads=torch.get_num_threads())
        self.factors = self.worker.factors

    def _score(self) -> dict[str, list[float]]:
        return {n: [s.score for s in t.evaluate(self.worker.engine).samples] for n, t in self.worker.tasks.items()}

    def genome(self, genome) -> dict[str, list[float]]:
        from cycleqd.model.genome import materialize

        with torch.no_grad():
            return self.state(materialize(genome, self.factors))

    def state(self, state: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
        self.worker.engine.load_weights(state)
        return self._score()

    def team(self, file: Path) -> dict[str, list[float]]:
        """A team row's file (written by :func:`save_teams`): its variant over its member genomes."""
        from cycleqd.model.genome import Genome
        from cycleqd.studies.team import Residents, Team, evaluate_team

        row = json.loads(Path(file).read_text())
        team = Team.from_json(row["team"])
        genomes = {m.genome: Genome.load(Path(file).parent / row["dir"] / f"{m.genome}.safetensors")
                   for m in team.members}
        results, _ = evaluate_team(team, Residents(self.worker.engine, self.factors, genomes), self.worker.tasks,
                                   [row["variant"]])
        return {n: [s.score for s in r.samples] for n, r in results[row["variant"]].items()}


def save_teams(snap: Any, store: Any, models_dir: Path, seed: int, *, rows: Mapping[str, str] = TEAM_ROWS,
               folder: str = "team") -> dict[str, str]:
    """Each team row's file for one run: members chosen on the run's archive scores (val only).

    ``rows`` maps the team variants to make to their rows (default all of them). The members'
    genomes go to ``models_dir/<folder>-s<seed>/``; a row's JSON (variant, team, that folder) to
    ``models_dir/<row>-s<seed>.json``. Returns {row: file name}.
    """
    from cycleqd.atomic import write_atomic
    from cycleqd.studies.team import STRATEGIES, choose_team

    folder = models_dir / f"{folder}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for strategy, variants in STRATEGIES.items():
        if not any(v in rows for v in variants):
            continue
        team = choose_team(snap, strategy, TEAM_SIZE)
        for m in team.members:
            shutil.copyfile(store.genome_path(m.genome), folder / f"{m.genome}.safetensors")
        for v in (v for v in variants if v in rows):
            name = f"{rows[v]}-s{seed}.json"
            write_atomic(models_dir / name, json.dumps({"variant": v, "team": team.to_json(), "dir": folder.name},
                                                       indent=1))
            files[rows[v]] = name
    return files


def _quality(items: Mapping[str, Sequence[float]]) -> dict[str, float]:
    return {t: sum(v) / len(v) for t, v in items.items()}


def _mean(scores: Mapping[str, float]) -> float:
    return float(sum(scores.values()) / len(scores))


def mergekit_merge(factors, method: str, weight: float) -> dict[str, torch.Tensor]:
    """task_arithmetic / ties over the experts with mergekit's in-memory API."""
    from mergekit.merge_methods import merge_state_dicts

    from cycleqd.model.genome import Genome, materialize

    models = {"base": materialize(Genome.base(factors), factors)}
    for k, t in enumerate(factors.task_names):
        models[t] = materialize(Genome.seed(k, factors), factors)
    params: dict[str, Any] = {"weight": weight}
    if method == "ties":
        params["density"] = TIES_DENSITY
    return merge_state_dicts(models, method, parameters=params, base="base")


def _row(model: str, per_seed: list[dict[str, float]]) -> dict:
    tasks = list(per_seed[0])
    means = [_mean(s) for s in per_seed]
    return {
        "model": model,
        "scores": {t: statistics.fmean(s[t] for s in per_seed) for t in tasks},
        "mean": statistics.fmean(means),
        "std": statistics.stdev(means) if len(means) > 1 else 0.0,
        "seeds": len(per_seed),
    }


def paired_interval(ours: Sequence[Mapping[str, Sequence[float]]], theirs: Mapping[str, Sequence[float]], *,
                    resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> dict:
    """Paired bootstrap interval of mean(ours) - mean(theirs) over test items.

    ``ours`` holds one {task: per-item scores} per seed, ``theirs`` one for a single model,
    all on the same items. The statistic is the 3-task mean of the per-item difference,
    ours averaged over seeds first. Items are resampled with replacement, paired: item
    ``i`` of every task is drawn together (tasks of equal size; else each task alone).

    Raises:
        ValueError: the two sides do not cover the same tasks and item counts.
    """
    tasks = list(theirs)
    if not ours or any(set(s) != set(tasks) or any(len(s[t]) != len(theirs[t]) for t in tasks) for s in ours):
        raise ValueError("paired_interval: both sides need the same tasks and items")
    import numpy as np

    diff = [np.mean([s[t] for s in ours], axis=0) - np.asarray(theirs[t], dtype=float) for t in tasks]
    rng = np.random.default_rng(seed)
    if len({len(d) for d in diff}) == 1:
        # one draw of item indices serves every task: item i is paired across the tasks
        idx = rng.integers(0, len(diff[0]), size=(resamples, len(diff[0])))
        draws = np.mean([d[idx].mean(axis=1) for d in diff], axis=0)
    else:
        draws = np.mean([d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1) for d in diff], axis=0)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(np.mean([d.mean() for d in diff])), "interval": [float(lo), float(hi)], "level": level,
            "resamples": resamples, "seeds": len(ours), "items_per_task": {t: len(d) for t, d in zip(tasks, diff)},
            "paired": "per item, the same item index in every task; seeds averaged per item"}


def side(interval: Sequence[float]) -> int:
    """Which side a paired interval of (ours - theirs) finds better: +1 ours, -1 theirs, 0 neither."""
    lo, hi = interval
    return 1 if lo > 0 else -1 if hi < 0 else 0


def conclusion(interval: Sequence[float], ours: str = "cycleqd_best", theirs: str = "task_arithmetic") -> str:
    """What a paired interval of (ours - theirs) says: which side is better, or neither at its level."""
    return {1: f"{ours} better", -1: f"{theirs} better", 0: "no difference"}[side(interval)]


RUNS_DIR = "runs"
#: the order of the evolved rows in the manifest and the table (single models, then teams)
ROW_ORDER = ("cycleqd_best", "cycleqd_merged", "fixed_axes", "gaussian_mutation", "uniform_sampling",
             "cma_es_best", "nsga2_best", "random_best", *TEAM_ROWS.values(), "nsga2_team_router", "nsga2_team_vote")
#: a row file's seed: ``<row>-s<seed>.safetensors`` / ``.json``
_SEED_OF = re.compile(r"-s(\d+)\.(?:safetensors|json)$")
#: the teams of NSGA-II's front (its per-task bests): variant -> row
FRONT_TEAM_ROWS = {"router_task": "nsga2_team_router", "vote": "nsga2_team_vote"}


def row_name(variant: str) -> str:
    """The table row of a variant's chosen models: cycleqd_best, <search>_best, or the ablation's name."""
    return "cycleqd_best" if variant == "cycleqd" else f"{variant}_best" if variant in SEARCH_VARIANTS else variant


def front_snapshot(snap: Any, front: Sequence[Mapping[str, Any]]) -> Any:
    """``snap`` with each archive replaced by the Pareto front (every front member, ranked by that task).

    A team chosen from it (:func:`cycleqd.studies.team.choose_team`) takes its router member and
    voters per task from the front: the front's per-task bests.
    """
    from dataclasses import replace

    elites = [{"genome": f["genome"], "scores": dict(f["scores"]), "generation": f["generation"], "cell": ()}
              for f in front]
    return replace(snap, archives={t: {"elites": [{**e, "quality": float(e["scores"][t])} for e in elites]}
                                   for t in snap.tasks})


def _check_same_table(old: dict, new: dict, models_dir: Path) -> None:
    """A models folder is added to only by the same experiment (config, world, budget, selection)."""
    a = parse_config(old["config"]).model_dump(mode="json")
    diff = _differences(a, new["config"])
    for key in ("world", "generations", "evolve_n", "select"):
        if old.get(key) != new[key]:
            diff.append(f"{key}: {old.get(key)!r} -> {new[key]!r}")
    if diff:
        raise ConfigError(f"{models_dir} holds a table made with other settings ({'; '.join(diff[:3])}); "
                          "pass another --models folder")


def _rows_by_seed(manifest: dict) -> tuple[dict[str, dict[int, str]], dict[str, dict[int, dict]]]:
    """A manifest's rows and budget as {row: {seed: file}} and {row: {seed: budget}}."""
    rows = {name: {int(_SEED_OF.search(f).group(1)): f for f in files} for name, files in manifest["rows"].items()}
    budget: dict[str, dict[int, dict]] = {}
    for name, runs in manifest.get("budget", {}).items():
        seeds = sorted(rows.get(name, {}))
        for i, r in enumerate(runs):
            budget.setdefault(name, {})[int(r.get("seed", seeds[i] if i < len(seeds) else i))] = r
    return rows, budget


def choose_models(cfg: Config, models_dir: Path, *, seeds: int = 3, generations: int | None = None,
                  runs_root: Path = Path("archives/table"), variants: list[str] | None = None,
                  evolve_n: int | None = None, select_n: int = 200, shortlist_k: int = 5,
                  in_process: bool = False) -> dict:
    """Evolve (or resume) every run, choose each row's models on val, write them to ``models_dir``.

    Resumable run by run: as soon as a run ends its chosen model(s), a record of the choice
    (``runs/<variant>-s<seed>.json``: the shortlist's per-item scores on the selection items, the
    budget) and the manifest ``models.json`` are written. A later call skips every run whose
    models are already in the folder (no evolution, no scoring), keeps the merge weights chosen
    before, and adds the rows of other variants and seeds to the same manifest.

    Returns the manifest. Nothing here reads a test item.

    Raises:
        ConfigError: an existing run folder holds another experiment, or the models folder
            holds a table made with other settings.
    """
    from cycleqd.atomic import write_atomic
    from cycleqd.model.genome import Genome
    from cycleqd.runs.store import model_fingerprints

    unresolved = cfg
    for v in variants or []:
        if v not in VARIANTS:
            raise ConfigError(f"unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    cfg = ready_config(cfg)
    models_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "config": unresolved.model_dump(mode="json"),
        "world": model_fingerprints(cfg),
        "mini": cfg.models.mini.model_dump(mode="json") if cfg.models.mini else None,
        "generations": generations or cfg.evolution.generations,
        "seeds": seeds,
        "evolve_n": evolve_n,
        "select": {"split": "val", "n": select_n, "disjoint_from_evolution": True, "shortlist": shortlist_k},
    }
    rows: dict[str, dict[int, str]] = {}
    budget: dict[str, dict[int, dict]] = {}
    merges: dict[str, dict] = {}
    if (models_dir / MODELS_FILE).is_file():
        old = read_models(models_dir)
        _check_same_table(old, manifest, models_dir)
        rows, budget = _rows_by_seed(old)
        merges = old.get("merges", {})
        manifest["seeds"] = max(seeds, int(old.get("seeds", 0)))
    for rec_file in sorted((models_dir / RUNS_DIR).glob("*.json")):  # a run recorded before the manifest was
        rec = json.loads(rec_file.read_text())
        for name, file in rec["rows"].items():
            rows.setdefault(name, {})[rec["seed"]] = file
        budget.setdefault(rec["row"], {})[rec["seed"]] = rec["budget"]

    def save() -> dict:
        order = {n: i for i, n in enumerate(ROW_ORDER)}
        manifest.update(merges=merges, rows={n: [fs[s] for s in sorted(fs)] for n, fs in rows.items()},
                        budget={n: [{"seed": s, **b[s]} for s in sorted(b)] for n, b in budget.items()})
        manifest["rows"] = dict(sorted(manifest["rows"].items(), key=lambda kv: order.get(kv[0], len(order))))
        write_atomic(models_dir / MODELS_FILE, json.dumps(manifest, indent=1))
        return manifest

    todo = [(v, s) for v in variants or list(VARIANTS) for s in range(seeds) if s not in rows.get(row_name(v), {})]
    if not todo and merges:
        return save()
    # Model choices (merge weights, which elite) are made on val items that evolution never
    # scored: picking the best of many elites on the evolution's own noisy scores would
    # favour lucky ones.
    val = Scorer(selection_config(variant_config(cfg, "cycleqd", 0, generations, evolve_n), select_n))
    f = val.factors
    for method in ("task_arithmetic", "ties"):
        if method not in merges:
            best_w = max(MERGE_WEIGHTS, key=lambda w: _mean(_quality(val.state(mergekit_merge(f, method, w)))))
            merges[method] = {"weight": best_w, **({"density": TIES_DENSITY} if method == "ties" else {})}
        print(f"{method}: weight {merges[method]['weight']} (chosen on val)", flush=True)
    for k in range(len(cfg.task_names)):  # the seed experts and base are genomes too: one way to score all
        Genome.seed(k, f).save(models_dir / f"expert_{cfg.task_names[k]}.safetensors")
    Genome.base(f).save(models_dir / "base.safetensors")
    save()
    for variant, seed in todo:
        rec = choose_run(cfg, variant, seed, val, models_dir, generations=generations, runs_root=runs_root,
                         evolve_n=evolve_n, shortlist_k=shortlist_k, in_process=in_process)
        for name, file in rec["rows"].items():
            rows.setdefault(name, {})[seed] = file
        budget.setdefault(rec["row"], {})[seed] = rec["budget"]
        save()
    return save()


def choose_run(cfg: Config, variant: str, seed: int, val: "Scorer", models_dir: Path, *,
               generations: int | None, runs_root: Path, evolve_n: int | None, shortlist_k: int,
               in_process: bool = False) -> dict:
    """Evolve (or resume) one run (on Ray, or ``in_process``), choose its models on the selection items,
    write them and their record.

    Returns the record also written to ``models_dir/runs/<variant>-s<seed>.json``.
    """
    import time

    from cycleqd.atomic import write_atomic
    from cycleqd.evolve.loop import evolve, resume
    from cycleqd.runs.folder import RunFolder
    from cycleqd.runs.store import RunStore

    name = row_name(variant)
    vcfg = variant_config(cfg, variant, seed, generations, evolve_n)
    run = runs_root / f"{variant}-s{seed}"
    wall_file = run / "table_wall.json"  # wall seconds of every call that drove this run, summed
    t0 = time.monotonic()
    try:
        if (run / layout.CONFIG).exists():
            check_same_experiment(RunStore(run).config(), vcfg, run)
            resume(run, generations=vcfg.evolution.generations, progress=True, in_process=in_process)
        else:
            evolve(vcfg, run, progress=True, in_process=in_process)
    finally:
        if run.is_dir():
            before = json.loads(wall_file.read_text())["wall_seconds"] if wall_file.is_file() else 0.0
            write_atomic(wall_file, json.dumps({"wall_seconds": before + time.monotonic() - t0}))
    store = RunStore(run)
    # the run's top elites by its own mean, re-scored on the selection sample
    folder = RunFolder(run)
    snap = folder.snapshot()
    elites = {e["genome"]: e for a in snap.archives.values() for e in a["elites"]}
    shortlist = sorted(elites.values(), key=lambda e: -_mean(e["scores"]))[:shortlist_k]
    scored = [(e, val.genome(store.load_genome(e["genome"]))) for e in shortlist]
    top = max(scored, key=lambda es: _mean(_quality(es[1])))[0]
    file = f"{name}-s{seed}.safetensors"
    shutil.copyfile(store.genome_path(top["genome"]), models_dir / file)
    rows = {name: file}
    fm = store.final_merge()
    if variant == "cycleqd" and fm and fm.get("error") is None:
        shutil.copyfile(store.genome_path(fm["genome"]), models_dir / f"cycleqd_merged-s{seed}.safetensors")
        rows["cycleqd_merged"] = f"cycleqd_merged-s{seed}.safetensors"
    if variant == "cycleqd":  # teams of this run's elites, chosen on its own (val) scores
        rows.update(save_teams(snap, store, models_dir, seed))
    if variant == "nsga2":  # teams of its archive, the Pareto front: router and vote over its per-task bests
        rows.update(save_teams(front_snapshot(snap, folder.front()), store, models_dir, seed,
                               rows=FRONT_TEAM_ROWS, folder="nsga2_team"))
    done = store.children()  # the budget: children, the workers' seconds on them, the run's wall seconds
    record = {
        "variant": variant, "seed": seed, "run": str(run), "row": name, "chosen": top["genome"], "rows": rows,
        "budget": {"children": len(done), "child_seconds": sum(sum(c.seconds.values()) for c in done),
                   "wall_seconds": json.loads(wall_file.read_text())["wall_seconds"]},
        "shortlist": [{"genome": e["genome"], "evolution_mean": _mean(e["scores"]), "selection_mean": _mean(
            _quality(items)), "selection_items": items} for e, items in scored],
    }
    (models_dir / RUNS_DIR).mkdir(exist_ok=True)
    write_atomic(models_dir / RUNS_DIR / f"{variant}-s{seed}.json", json.dumps(record))
    print(f"{variant} seed {seed}: chose {top['genome']} of {run}", flush=True)
    return record


def read_models(models_dir: Path) -> dict:
    """The manifest of a models folder.

    Raises:
        ConfigError: no such folder or no manifest in it.
    """
    f = Path(models_dir) / MODELS_FILE
    if not f.is_file():
        raise ConfigError(f"{models_dir}: no {MODELS_FILE} (make the table first: make table)")
    return json.loads(f.read_text())


class ScoreCache:
    """Per-item test scores of the models a table scored, by what was scored and on which draw.

    A file per model under ``folder``, named by a hash of the world's fingerprints, the draw
    (seed, items per task) and the model's bytes (a team: its JSON and its members' genomes; a
    merge: its method and weight). An interrupted scoring resumes where it stopped; a model
    or a draw that differs is scored again. ``folder`` None keeps nothing.
    """

    def __init__(self, folder: Path | None, world: Mapping[str, str], test_seed: int, test_n: int):
        self.folder = Path(folder) if folder is not None else None
        self.key = json.dumps([dict(world), test_seed, test_n])

    def get(self, what: bytes, score) -> dict[str, list[float]]:
        """The cached scores of ``what`` (the model's identity), else ``score()``, kept."""
        import hashlib

        from cycleqd.atomic import write_atomic

        if self.folder is None:
            return score()
        file = self.folder / f"{hashlib.sha256(self.key.encode() + what).hexdigest()[:24]}.json"
        if file.is_file():
            return json.loads(file.read_text())
        out = score()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(file, json.dumps(out))
        return out


def _team_bytes(file: Path) -> bytes:
    """A team row's identity: its JSON and its members' genomes."""
    row = json.loads(file.read_text())
    members = sorted({m["genome"] for m in row["team"]["members"]})
    return file.read_bytes() + b"".join((file.parent / row["dir"] / f"{g}.safetensors").read_bytes()
                                        for g in members)


def score_models(models_dir: Path, *, test_n: int = TEST_N, test_seed: int = 0,
                 cache: Path | None = None) -> dict:
    """Score every row of a models folder on a test draw; the table object (rows, interval).

    The world is built when absent (deterministic in its seed and recipe). ``cache``: a folder
    of per-model scores (:class:`ScoreCache`), so an interrupted scoring resumes.

    Raises:
        ConfigError: no manifest, or the world's weights differ from the ones the genomes were made on.
    """
    from cycleqd.model.genome import Genome
    from cycleqd.runs.store import model_fingerprints

    manifest = read_models(models_dir)
    cfg = ready_config(parse_config(manifest["config"]))
    now = model_fingerprints(cfg)
    if now != manifest["world"]:
        changed = sorted(k for k in set(now) | set(manifest["world"]) if now.get(k) != manifest["world"].get(k))
        raise ConfigError(f"{models_dir}: the world's {', '.join(changed)} differ from the ones these genomes "
                          f"were made on (fingerprints in {MODELS_FILE}); rebuild that world or make the table again")
    test = Scorer(split_config(cfg, "test", test_n, test_seed))
    f = test.factors
    kept = ScoreCache(cache, now, test_seed, test_n)
    path = lambda file: Path(models_dir) / file  # noqa: E731

    def genome(file: str) -> dict[str, list[float]]:
        return kept.get(path(file).read_bytes(), lambda: test.genome(Genome.load(path(file))))

    def member(file: str) -> dict[str, list[float]]:
        if file.endswith(".json"):
            return kept.get(_team_bytes(path(file)), lambda: test.team(path(file)))
        return genome(file)

    items: dict[str, list[dict[str, list[float]]]] = {"base": [genome("base.safetensors")]}
    for t in cfg.task_names:
        items[f"expert_{t}"] = [genome(f"expert_{t}.safetensors")]
    for method, m in manifest["merges"].items():
        items[method] = [kept.get(json.dumps([method, m]).encode(),
                                  lambda: test.state(mergekit_merge(f, method, m["weight"])))]
    for name, files in manifest["rows"].items():
        items[name] = [member(file) for file in files]
        print(f"{name}: {[round(_mean(_quality(s)), 3) for s in items[name]]}", flush=True)
    rows = []
    for name, per_seed in items.items():
        row = _row(name, [_quality(s) for s in per_seed])
        if name in manifest["merges"]:
            row["weight"] = manifest["merges"][name]["weight"]
        if name in manifest.get("budget", {}):  # per seed: children evolved, workers' and wall seconds
            runs = manifest["budget"][name]
            for key in ("children", "child_seconds", "wall_seconds"):
                if all(key in r for r in runs):
                    row[key] = statistics.fmean(r[key] for r in runs)
        rows.append(row)
    table = {"split": "test", "test_n": test_n, "test_seed": test_seed, "generations": manifest["generations"],
             "evolve_n": manifest["evolve_n"], "select": manifest["select"], "world": manifest["world"],
             "rows": rows}
    ta = items["task_arithmetic"][0]
    if "cycleqd_best" in items:
        table[INTERVAL_KEY] = paired_interval(items["cycleqd_best"], ta)
        table[INTERVAL_KEY]["conclusion"] = conclusion(table[INTERVAL_KEY]["interval"])
    # every other evolved row against the same rival, on the same items (for the record, not to choose)
    table[VERSUS_KEY] = {}
    for name in manifest["rows"]:
        if name != "cycleqd_best":
            d = paired_interval(items[name], ta)
            table[VERSUS_KEY][name] = {"mean": d["mean"], "interval": d["interval"],
                                       "conclusion": conclusion(d["interval"], name)}
    # the other searches against CycleQD at equal budget (cycleqd_best's seeds averaged per item)
    if "cycleqd_best" in items:
        table[VERSUS_CYCLEQD_KEY] = {}
        cq = items["cycleqd_best"]
        cq_mean = {t: [statistics.fmean(s[t][i] for s in cq) for i in range(len(cq[0][t]))] for t in cq[0]}
        for name in (f"{v}_best" for v in SEARCH_VARIANTS):
            if name in items:
                d = paired_interval(items[name], cq_mean)
                table[VERSUS_CYCLEQD_KEY][name] = {"mean": d["mean"], "interval": d["interval"],
                                                   "conclusion": conclusion(d["interval"], name, "cycleqd_best")}
        # NSGA-II's front as a team against the same kind of team of CycleQD's archives
        for variant, name in FRONT_TEAM_ROWS.items():
            rival = TEAM_ROWS[variant]
            if name in items and rival in items:
                theirs = items[rival]
                mean = {t: [statistics.fmean(s[t][i] for s in theirs) for i in range(len(theirs[0][t]))]
                        for t in theirs[0]}
                d = paired_interval(items[name], mean)
                table[VERSUS_CYCLEQD_KEY][name] = {"mean": d["mean"], "interval": d["interval"], "rival": rival,
                                                   "conclusion": conclusion(d["interval"], name, rival)}
    return table


def make_table(cfg: Config, out: Path, *, models_dir: Path | None = None, seeds: int = 3,
               generations: int | None = None, runs_root: Path = Path("archives/table"),
               test_n: int | None = TEST_N, test_seed: int = 0, variants: list[str] | None = None,
               evolve_n: int | None = None, select_n: int = 200, shortlist_k: int = 5,
               cache: Path | None = None, in_process: bool = False) -> dict:
    """:func:`choose_models` then :func:`score_models`; writes the table JSON to ``out``."""
    from cycleqd.atomic import write_atomic

    models_dir = models_dir or out.parent / f"{out.stem}_models"
    choose_models(cfg, models_dir, seeds=seeds, generations=generations, runs_root=runs_root, variants=variants,
                  evolve_n=evolve_n, select_n=select_n, shortlist_k=shortlist_k, in_process=in_process)
    table = score_models(models_dir, test_n=test_n or TEST_N, test_seed=test_seed, cache=cache)
    write_atomic(out, json.dumps(table, indent=2))
    return table


def plot_table(table: dict, path: Path) -> None:
    """Bar chart of the 3-task mean (error bars: std over seeds) per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    colors = ["#27a" if r["model"].startswith("team") else
              "#2a7" if r["model"].startswith(("cycleqd", "fixed", "gauss", "uniform")) else "#999" for r in rows]
    ax.bar(range(len(rows)), [r["mean"] for r in rows], yerr=[r["std"] for r in rows], color=colors, capsize=3)
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=35, ha="right")
    ax.set_ylabel("mean over tasks (test)")
    ax.set_title("mini world: CycleQD vs experts and merges")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(table: dict) -> None:
    for r in table["rows"]:
        budget = f"  ({r['children']:.0f} children, {r['child_seconds']:.0f} worker s" if "children" in r else ""
        budget += (f", {r['wall_seconds']:.0f} wall s)" if "wall_seconds" in r else ")") if budget else ""
        print(f"{r['model']:20s} mean {r['mean']:.3f} ± {r['std']:.3f}  " +
              "  ".join(f"{t} {v:.3f}" for t, v in r["scores"].items()) + budget)
    if INTERVAL_KEY in table:
        d = table[INTERVAL_KEY]
        print(f"cycleqd_best - task_arithmetic: {d['mean']:+.4f}, 95% interval "
              f"[{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}] (paired bootstrap over test items): "
              f"{conclusion(d['interval'])}")
    for name, d in table.get(VERSUS_KEY, {}).items():
        print(f"{name} - task_arithmetic: {d['mean']:+.4f}, [{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}]: "
              f"{d['conclusion']}")
    for name, d in table.get(VERSUS_CYCLEQD_KEY, {}).items():
        print(f"{name} - {d.get('rival', 'cycleqd_best')}: {d['mean']:+.4f}, "
              f"[{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}]: "
              f"{d['conclusion']}")
