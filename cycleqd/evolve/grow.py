"""``cycleqd grow``: add one task and its expert to a run (K -> K + 1) without starting over.

A genome is coefficients over the experts' task vectors and SVD factors, so an
existing genome with coefficient 0 on the new expert is already a genome of the
grown run, and it materialises to the same weights. Growing therefore:

1. builds the new expert if the spec says how (a mini skill, on first use);
2. prepares the grown factors (the new expert's task vector and SVD factors, cached);
3. rewrites every genome with a zero column for the new expert (same weights, new layout);
4. scores the seed experts and every elite on the new task, and the new expert on all
   K + 1 tasks; earlier scores are kept from the log, never recomputed;
5. appends those scores to ``growth.jsonl`` and rebuilds the K + 1 archives from the log
   (:func:`cycleqd.runs.history.run_history`), so a later replay rebuilds them exactly;
6. records the grown config and the new expert's fingerprint (``models.json``).

Everything is written into ``RUN/.grow`` first; a ``READY`` file then marks the
staged state complete and it is switched in by renames. A growth killed before
``READY`` is discarded, one killed after it is finished, by the next ``grow`` or
``resume`` (:func:`finish_staged_growth`): the run is as it was or grown, never
half-grown.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cycleqd.atomic import fsync_dir, write_atomic
from cycleqd.config import MAX_SEED, ArchiveConfig, ConfigError, TaskConfig, dump_config, edit_config
from cycleqd.evolve.events import Observer, notify
from cycleqd.runs import layout
from cycleqd.runs.folder import RunFolder
from cycleqd.runs.store import RunStore

log = logging.getLogger("cycleqd")

STAGE = ".grow"
READY = "READY"
_REPLACED = (layout.CONFIG, layout.MODELS, layout.SEEDS, layout.GROWTH_LOG, layout.ARCHIVES, layout.STATS)
_REMOVED = (layout.FINAL, layout.SUMMARY)  # of the K-task run: redone by the next resume


class MiniExpert(BaseModel):
    """Build the new expert on first use: an extra mini skill trained from the world's base."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    skill: str
    dir: str = ".cache/mini"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    size: Literal["default", "small", "tiny"] = "default"


class GrowSpec(BaseModel):
    """What ``cycleqd grow RUN --task SPEC.yaml`` adds: one task, its expert, optionally a new archive kind."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    task: TaskConfig
    expert: str
    mini: MiniExpert | None = None
    archive: ArchiveConfig | None = None


def load_grow_spec(path: str | os.PathLike) -> GrowSpec:
    """Read a grow spec YAML. Raises ConfigError (bad input) with one line."""
    from cycleqd.registry import TASKS, UnknownNameError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"grow spec {str(path)!r} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with task and expert")
    try:
        spec = GrowSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "spec"
        raise ConfigError(f"{path}: {loc}: {err['msg'].removeprefix('Value error, ')}") from None
    try:
        TASKS.check(spec.task.kind)
    except UnknownNameError as e:
        raise ConfigError(f"{path}: {e}") from None
    if spec.mini is None and not Path(spec.expert).exists():
        raise ConfigError(f"{path}: expert path {spec.expert!r} does not exist")
    return spec


# ------------------------------------------------------------------------------------------ genomes


def widen_genome(genome, old, new):
    """``genome`` of factors ``old`` (K experts) as a genome of ``new`` (the same K plus one more, last).

    The new expert's task-vector coefficients and SVD coefficients are 0, so
    :func:`cycleqd.model.genome.materialize` gives the same weights. Raises ValueError if
    ``new`` is not ``old`` plus one expert.
    """
    import torch

    from cycleqd.model.genome import Genome

    genome.check(old)
    K = old.num_experts
    if new.task_names[:K] != old.task_names or new.num_experts != K + 1 or new.names != old.names \
            or new.ranks != old.ranks:
        raise ValueError("the grown factors are not the run's factors plus one expert")
    a = torch.cat([genome.a, torch.zeros(genome.a.shape[0], 1, dtype=genome.a.dtype)], dim=1)
    d = torch.zeros(new.d_size, dtype=genome.d.dtype)
    for n in old.svd_names:
        r = old.ranks[n]
        d[new.d_slices[n]].view(K + 1, r)[:K] = genome.d[old.d_slices[n]].view(K, r)
    return Genome(a=a, d=d, layout=new.layout, terms=genome.terms)


# ------------------------------------------------------------------------------------ staged switch


def _stage(run: Path) -> Path:
    return run / STAGE


def finish_staged_growth(run_dir: str | os.PathLike) -> str | None:
    """Finish or discard a growth a kill interrupted; ``"finished"``, ``"discarded"`` or None (none there).

    Staged but not ``READY``: discarded (the run is as it was). ``READY``: every
    staged file and the genomes folder are renamed into place, and the K-task
    run's final merge and summary removed. Each step can be redone, so a kill
    during this function is finished by the next call.
    """
    run = Path(run_dir)
    stage = _stage(run)
    if not stage.exists():
        return None
    if not (stage / READY).is_file():
        shutil.rmtree(stage)
        return "discarded"
    if (stage / layout.GENOMES).exists():
        if (run / layout.GENOMES).exists() and not (stage / "genomes.old").exists():
            os.rename(run / layout.GENOMES, stage / "genomes.old")
        os.rename(stage / layout.GENOMES, run / layout.GENOMES)
    for name in _REPLACED:
        if (stage / name).exists():
            os.replace(stage / name, run / name)
    for name in _REMOVED:
        (run / name).unlink(missing_ok=True)
    shutil.rmtree(stage)
    return "finished"


# ----------------------------------------------------------------------------------------- the step


def grow(run_dir: str | os.PathLike, spec: GrowSpec, *, progress: bool = True,
         observers: Sequence[Observer] = ()) -> Path:
    """Add ``spec``'s task and expert to the run in ``run_dir`` (see the module docstring).

    Holds the run folder's lock throughout, so no driver resumes a half-grown run.

    Raises:
        ConfigError: not a run, a task name the run has, or a grown config that does not validate;
            RunLocked while a driver runs on the folder.
        RuntimeError: the new expert could not be evaluated (the run is left as it was).
        RunInterrupted: SIGTERM or SIGINT; the run is as it was, or grown once the next
            ``grow`` or ``resume`` finishes the staged growth.
    """
    from cycleqd.evolve.signals import RunInterrupted, StopSignals
    from cycleqd.runs.lock import RunLock

    store = RunStore(run_dir)
    with RunLock(store.path), StopSignals():
        try:
            run = _grow(store, spec, progress=progress)
        except RunInterrupted as e:
            # RUN/.grow stays: the next grow or resume finishes it (READY) or discards it, as after a SIGKILL
            raise RunInterrupted(e.signum, store.path) from None
    notify(observers, "run_done", run, RunFolder(run).archive())
    return run


def _grow(store: RunStore, spec: GrowSpec, *, progress: bool) -> Path:
    from cycleqd.config import resolve_paths
    from cycleqd.evolve.worker import ChildWorker
    from cycleqd.model.experts import model_fingerprint
    from cycleqd.model.factors import Factors
    from cycleqd.model.genome import Genome

    run = store.path
    finish_staged_growth(run)
    old_cfg = store.config()
    name = spec.task.name
    if name in old_cfg.task_names:
        raise ConfigError(f"the run already has a task {name!r} (tasks: {', '.join(old_cfg.task_names)})")
    if old_cfg.evolution.search.name != "cycleqd":  # a coefficient search's box has one axis per expert
        raise ConfigError(f"{run}: a run of evolution.search {old_cfg.evolution.search.name} cannot grow; "
                          "growing adds a task to CycleQD runs")
    if not store.seeds() or len(store.seeds()) < len(old_cfg.task_names):
        raise ConfigError(f"{run}: the run has not evaluated its seed experts yet; resume it before growing")

    # The grown config: the new task and expert last, so the first K coefficient columns stay put.
    def grown(data: dict) -> None:
        data["tasks"].append(spec.task.model_dump())
        data["models"]["experts"][name] = spec.expert
        if spec.archive is not None:
            data["archive"] = spec.archive.model_dump()

    new_cfg = resolve_paths(edit_config(old_cfg, grown, "grown config"))

    # The new expert exists before anything is staged (a mini skill is trained on first use).
    if spec.mini is not None:
        from cycleqd.mini.expert import ensure_extra_expert

        built = ensure_extra_expert(spec.mini.dir, spec.mini.skill, seed=spec.mini.seed, size=spec.mini.size,
                                    progress=progress)
        if Path(new_cfg.models.experts[name]).resolve() != built.resolve():
            raise ConfigError(f"expert {spec.expert!r} is not the folder the mini skill is built in ({built})")
    models = dict(store.models() or {})
    models[f"expert_{name}"] = model_fingerprint(new_cfg.models.experts[name], new_cfg.models.revision)

    old_f = Factors.prepare(old_cfg, progress=progress)
    new_f = Factors.prepare(new_cfg, progress=progress)

    stage = _stage(run)
    stage.mkdir()
    t0 = time.perf_counter()
    # Every genome gains a zero column for the new expert: same weights, the grown layout.
    (stage / layout.GENOMES).mkdir()
    for p in sorted((run / layout.GENOMES).glob("*.safetensors")):
        widened = widen_genome(Genome.load(p), old_f, new_f)
        (stage / layout.GENOMES / p.name).write_bytes(widened.to_bytes())
    seed_id = f"seed_{name}"
    new_seed = Genome.seed(new_cfg.task_names.index(name), new_f)
    (stage / layout.GENOMES / f"{seed_id}.safetensors").write_bytes(new_seed.to_bytes())

    # Score the new task on the seeds and every elite; the new expert on all K + 1 tasks.
    folder = RunFolder(run)
    seeds, old_arch = folder.seeds, folder.archive()
    todo = list(dict.fromkeys([s["genome"] for s in seeds.values()] + [e.genome for e in old_arch.all_elites()]))
    worker = ChildWorker(new_cfg, 0)
    new_scores, _ = worker.evaluate(new_seed)
    scored: dict[str, float] = {}
    from tqdm import tqdm

    for gid in tqdm(todo, desc=f"scoring {name}", disable=not progress, dynamic_ncols=True):
        g = Genome.load(stage / layout.GENOMES / f"{gid}.safetensors")
        scored[gid] = float(worker.evaluate(g, tasks=[name])[0][name])
    seeds = {t: {"genome": s["genome"], "scores": {**s["scores"], name: scored[s["genome"]]}} for t, s in seeds.items()}
    seeds[name] = {"genome": seed_id, "scores": dict(new_scores)}
    finished = folder.generation
    growth = {"task": name, "generation": finished, "expert": new_cfg.models.experts[name],
              "fingerprint": models[f"expert_{name}"], "scores": scored,
              "seconds": round(time.perf_counter() - t0, 2)}

    # The K + 1 archives from the log as it will be, by the same replay every resume makes.
    grown = folder.archive_if_grown(new_cfg, seeds, growth)
    snapshot = grown.to_json(finished)
    stats_line = {"generation": finished, "grown": name,
                  "archives": {t: grown.stats(t) for t in grown.tasks}}

    write_atomic(stage / layout.CONFIG, dump_config(new_cfg))
    write_atomic(stage / layout.MODELS, json.dumps(models, indent=1))
    write_atomic(stage / layout.SEEDS, json.dumps(seeds, indent=1))
    write_atomic(stage / layout.ARCHIVES, json.dumps(snapshot))
    _copy_plus_line(run / layout.GROWTH_LOG, stage / layout.GROWTH_LOG, growth)
    _copy_plus_line(run / layout.STATS, stage / layout.STATS, stats_line)
    fsync_dir(stage / layout.GENOMES)
    write_atomic(stage / READY, json.dumps({"task": name}))
    finish_staged_growth(run)
    log.info("grew %s by task %s: %d models scored, %d elites", run, name, len(todo), len(grown.all_elites()))
    return run




def _copy_plus_line(src: Path, dst: Path, record: dict) -> None:
    """``dst`` = the complete lines of ``src`` plus ``record`` (a torn last line of a killed writer is dropped)."""
    raw = src.read_bytes() if src.exists() else b""
    raw = raw[: raw.rfind(b"\n") + 1]
    write_atomic(dst, raw + (json.dumps(record) + "\n").encode())
