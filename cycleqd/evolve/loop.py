"""evolve / resume: the CycleQD loop, top to bottom.

check everything (preflight) -> lock the run folder -> seed experts ->
(per child) scheduler.ask: quality task, parents from its archive -> a worker
does crossover, mutation, materialize, evaluation on K tasks -> save the genome
-> scheduler.tell: offer to all K archives -> log, snapshot, observers -> final
merge. One generation is one finished child (see :mod:`cycleqd.search.child`).

SIGTERM and SIGINT are handled alike: the loop stops asking, cancels the
children in flight, keeps everything already written (every finished child is
on disk before the next is asked) and raises :class:`RunInterrupted`; the CLI
turns that into one line and exit 1, and ``cycleqd resume`` continues the run.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from cycleqd.atomic import write_atomic
from cycleqd.config import Config, dump_config, resolve_paths, with_overrides
from cycleqd.evolve.events import Observer, notify
from cycleqd.evolve.guards import TruncationGuard
from cycleqd.evolve.pool import LocalPool, RayPool, local_ray_env, start_ray
from cycleqd.evolve.signals import RunInterrupted, StopSignals
from cycleqd.recent import Recent
from cycleqd.runs.folder import RunFolder
from cycleqd.runs.lock import RunLock
from cycleqd.runs.store import RunStore, check_models, default_run_dir
from cycleqd.search.archive import Archive
from cycleqd.search.child import ChildRecord, SeedRecord
from cycleqd.search.scheduler import Scheduler
from cycleqd.search.searches import make_scheduler

if TYPE_CHECKING:
    from cycleqd.search.child import ChildResult

__all__ = ["Observer", "RunInterrupted", "StopSignals", "evolve", "resume", "drive", "run_loop",
           "final_merge", "summarize", "format_summary", "local_ray_env"]

log = logging.getLogger("cycleqd")

POLL_SECONDS = 0.5  # how often a waiting loop looks at the stop flag
SNAPSHOT_SECONDS = 2.0  # archives.json is rewritten at most this often while children stream in, and at the end


class _Progress:
    """A tqdm bar over generations with each archive's best quality."""

    def __init__(self, target: int, initial: int):
        from tqdm import tqdm

        self.bar = tqdm(total=target, initial=min(initial, target), desc="generations", dynamic_ncols=True)

    def seeds_done(self, run_dir: Path, archive: Archive) -> None:
        pass

    def child_done(self, run_dir: Path, record: ChildRecord, archive: Archive) -> None:
        best = {t: archive.stats(t)["best"] for t in archive.tasks}
        self.bar.set_postfix({t: f"{v:.2f}" for t, v in best.items()}, refresh=False)
        self.bar.update(1)

    def run_done(self, run_dir: Path, archive: Archive) -> None:
        self.bar.close()


def _check_genomes(folder: RunFolder) -> None:
    """Every genome the seeds and the log point at is there and whole (headers only, no archive replay),
    so a damaged parent is named before any child is asked rather than failing its children one by one."""
    for gid in [s["genome"] for s in folder.seeds.values()] + [c.id for c in folder.children if c.ok]:
        folder.store.check_genome(gid)


def evolve(cfg: Config, run_dir: str | os.PathLike | None = None, *, address: str | None = None,
           progress: bool = True, observers: Sequence[Observer] | None = None, in_process: bool = False) -> Path:
    """Start a new run of ``cfg`` in ``run_dir`` (default archives/<name>-<time>) and drive it
    (on Ray, or with ``in_process`` one worker in this process; see :func:`drive`).

    Every check (:func:`cycleqd.evolve.preflight.preflight`) runs before the folder is created.

    Raises:
        ConfigError: bad input (nothing written); RunLocked: another driver holds ``run_dir``;
        RunInterrupted: SIGTERM / SIGINT (the run resumes).
    """
    cfg = resolve_paths(cfg)
    _ready_models(cfg)
    path = Path(run_dir or default_run_dir(cfg))
    lock = RunLock(path)
    store = RunStore.create(path, cfg, lock=lock)
    try:
        return drive(store, address=address, progress=progress, observers=observers, in_process=in_process)
    finally:
        lock.release()


def resume(run_dir: str | os.PathLike, *, generations: int | None = None, address: str | None = None,
           progress: bool = True, observers: Sequence[Observer] | None = None, in_process: bool = False) -> Path:
    """Continue a run (after a crash, a signal, a growth or to more generations) from its log.

    The lock is taken first and the folder is read whole (log, seeds, the elites' genomes)
    before anything is written; a growth that a kill interrupted is finished or discarded.

    Raises:
        ConfigError: bad input or a damaged folder (RunDamaged names the file), RunLocked.
    """
    from cycleqd.evolve.grow import finish_staged_growth

    store = RunStore(run_dir)
    with RunLock(store.path):
        finish_staged_growth(store.path)
        store = RunStore(store.path)
        cfg = store.config()
        if generations is not None:
            cfg = with_overrides(cfg, generations=generations)
        _check_genomes(RunFolder(store))
        _ready_models(cfg)
        if cfg != store.config():
            write_atomic(store.path / RunStore.CONFIG, dump_config(cfg))
        return drive(store, address=address, progress=progress, observers=observers, in_process=in_process)


def _ready_models(cfg: Config) -> None:
    """Preflight, the mini world built when absent, then the model files checked (headers only)."""
    from cycleqd.evolve.preflight import CHECKS, check_model_files  # preflight() with the mini world built in between

    for check in CHECKS:
        if check is not check_model_files:
            check(cfg)
    # The mini world is built on first use, so `make evolve` works on a fresh clone.
    if cfg.models.mini is not None:
        from cycleqd.mini.build import ensure_mini_world

        ensure_mini_world(cfg)
    check_model_files(cfg)


def drive(store: RunStore, *, address: str | None = None, progress: bool = True,
          observers: Sequence[Observer] | None = None, in_process: bool = False) -> Path:
    """Set up and run the loop on Ray. Everything it needs is in the run folder, so it is also the resume path.

    ``in_process``: no Ray; one worker in this process evaluates the children one at a time
    (``evolution.workers`` is ignored). The run folder is the same either way, so a run may be
    resumed on Ray that began in process, and the other way round.

    The caller holds the run folder's lock.
    """
    cfg = store.config()
    observers = list(observers or ())
    with StopSignals() as stop:
        check_models(store, cfg)

        # Task vectors and SVD factors once, on the driver, into the shared cache;
        # the workers then load them instead of racing to compute them.
        from cycleqd.model.factors import warm_cache

        warm_cache(cfg, progress=progress)
        if progress:
            observers.append(_Progress(cfg.evolution.generations, len(store.children())))

        ray = None if in_process else start_ray(address)
        stop.install()  # after ray.init, which installs its own SIGTERM handler
        pool = None
        try:
            if in_process:
                from cycleqd.evolve.worker import ChildWorker

                if not progress:  # a Ray worker's loading bars go to its log; here they would reach the terminal
                    from transformers.utils import logging as hf_logging

                    hf_logging.disable_progress_bar()
                pool = LocalPool([ChildWorker(cfg, threads=os.cpu_count() or 1)])
            else:
                pool = RayPool(ray, cfg, cfg.evolution.workers)
            sched = run_loop(store, pool, observers, stop)
            # The paper's last step: one model from the archives' best elites, beta = softmax(quality).
            if cfg.evolution.final_merge and (store.final_merge() or {}).get("generation") != sched.generation:
                final_merge(store, sched.archive, pool, sched.generation)
            notify(observers, "run_done", store.path, sched.archive)
            summarize(store)
        except RunInterrupted as e:
            if pool is not None:
                pool.cancel()
            if ray is not None:
                try:
                    ray.shutdown()
                except BaseException:  # noqa: BLE001 - a second signal during shutdown: still a clean stop
                    pass
            raise RunInterrupted(e.signum, store.path, len(store.children())) from None
    return store.path


def run_loop(store: RunStore, pool: RayPool | LocalPool, observers: Sequence[Observer] = (),
             stop: StopSignals | None = None) -> Scheduler:
    """The loop: seed experts (generation 0), then ask / execute / tell until the target.

    Works with any pool (a :class:`~cycleqd.evolve.pool.LocalPool` runs it in process). The
    archives are rebuilt from the folder first, so a call on a half-finished run
    resumes it. Returns the scheduler (its archive and generation).

    Raises:
        RunInterrupted: ``stop`` saw a signal; in-flight children are cancelled, all
            finished ones are on disk.
        RuntimeError: a seed expert could not be evaluated.
    """
    cfg = store.config()
    tasks = cfg.task_names
    folder = RunFolder(store)
    archive = folder.archive()
    guard = TruncationGuard(cfg.evolution.truncation_warning)

    # Generation 0: the seed experts, evaluated like any child and committed one by one.
    missing = [t for t in tasks if t not in folder.seeds]
    if missing:
        genomes = dict(zip(tasks, pool.seed_genomes(len(tasks))))
        results = pool.run_genomes({f"seed_{t}": genomes[t] for t in missing})
        for t in missing:
            r: ChildResult = results[f"seed_{t}"]
            if r.error:
                raise RuntimeError(f"seed expert {t} could not be evaluated: {r.error}")
            archive.offer(r.id, r.scores, 0)
            guard.see(r.id, r.truncated)
            store.commit(SeedRecord(task=t, genome=r.id, scores=dict(r.scores), truncated=dict(r.truncated)),
                         r.genome, r.episodes, archive)
        notify(observers, "seeds_done", store.path, archive)
    elif folder.stale():
        store.write_archives(archive.to_json(folder.generation))

    # Steady state: every worker always has one child in flight; a finished child is
    # offered to all K archives and committed (genome, log line, snapshot) before the next is asked.
    # evolution.search: cycleqd (with its operator control's log in the folder), cma_es, nsga2, random
    sched = make_scheduler(cfg, archive, folder.children, folder=store.path)
    parent_cache: Recent[str, bytes] = Recent(256)  # parents are drawn again and again from the same elites

    def genome_bytes(gid: str) -> bytes:
        if gid not in parent_cache:
            parent_cache[gid] = store.genome_path(gid).read_bytes()
        return parent_cache[gid]

    if stop is not None:
        stop.polling = True
    if cfg.evolution.fsync == "batch":  # fsync in a background thread; a killed driver loses nothing
        store.start_syncer()
    next_snapshot, behind = time.monotonic() + SNAPSHOT_SECONDS, False
    try:
        while not sched.done():
            if stop is not None and stop.signum is not None:
                break
            for slot in pool.free():
                if not sched.wants_more():
                    break
                spec = sched.ask()
                pool.submit(slot, spec, [genome_bytes(p) for p in spec.parents])
            got = pool.wait(POLL_SECONDS if stop is not None else None)
            if got is None:
                continue
            spec, res = got
            if res.error is None:
                parent_cache[spec.id] = res.genome
            else:
                log.warning("child %s failed: %s", spec.id, res.error)
            record = sched.tell(spec, res)
            guard.see(record.id, record.truncated)
            # the snapshot (a cache of seeds + log) at most every SNAPSHOT_SECONDS: its size is the archives'
            fresh = sched.done() or time.monotonic() >= next_snapshot
            # only elites' conversations are kept (disk)
            store.commit(record, res.genome, res.episodes if record.inserted else None, archive, snapshot=fresh)
            if hasattr(sched, "search_state"):  # a coefficient search's state (a view; resume replays the log)
                store.write_search_state(sched.search_state())
            behind = not fresh
            if fresh:
                next_snapshot = time.monotonic() + SNAPSHOT_SECONDS
            notify(observers, "child_done", store.path, record, archive)
    finally:
        if stop is not None:
            stop.polling = False
        store.stop_syncer()  # every finished child fsynced before the loop returns or raises
    if behind:  # stopped between snapshots: leave archives.json matching the log
        store.write_archives(archive.to_json(sched.generation))
    if stop is not None and stop.signum is not None:
        pool.cancel()
        sched.forget_in_flight()
        raise RunInterrupted(stop.signum, store.path, sched.generation)
    pool.cancel()  # none in flight at the target; kept so no stray child outlives the loop
    return sched


def final_merge(store: RunStore, archive: Archive, pool: RayPool | LocalPool, generation: int) -> dict:
    """theta = theta_base + sum_k beta_k tau_k over the best elite of each archive; beta = softmax(f)."""
    from cycleqd.model.genome import Genome

    best = [max(archive.elites(t), key=lambda e: e.quality) for t in archive.tasks]
    f = np.array([e.quality for e in best])
    beta = np.exp(f - f.max())
    beta = beta / beta.sum()
    merged = Genome.combine([store.load_genome(e.genome) for e in best], [float(b) for b in beta])
    r: ChildResult = pool.run_genomes({"final_merge": merged.to_bytes()})["final_merge"]
    record = {
        "genome": "final_merge",
        "generation": generation,
        "sources": {t: e.genome for t, e in zip(archive.tasks, best)},
        "weights": {t: float(b) for t, b in zip(archive.tasks, beta)},
        "scores": dict(r.scores),
        "mean": float(np.mean(list(r.scores.values()))) if r.scores else math.nan,
        "error": r.error,
    }
    if r.error is None:
        store.save_genome("final_merge", r.genome)
    store.write_final_merge(record)
    return record


def summarize(store: RunStore) -> dict:
    """The run at a glance (:meth:`RunFolder.summary`), written to RUN/summary.json."""
    return RunFolder(store).write_summary()


def format_summary(s: dict) -> str:
    """A plain-text table of :func:`summarize`'s result."""
    tasks = list(s["archives"])
    head = f"{'model':24s}" + "".join(f"{t:>10s}" for t in tasks) + f"{'mean':>10s}"
    lines = [f"generation {s['generation']}", head, "-" * len(head)]

    def row(name: str, scores: dict) -> str:
        return f"{name:24s}" + "".join(f"{scores[t]:10.3f}" for t in tasks) + f"{scores['mean']:10.3f}"

    for t, sc in s["experts"].items():
        lines.append(row(f"expert {t}", sc))
    if s["best_mean"]:
        lines.append(row(f"best elite {s['best_mean']['genome']}", s["best_mean"]))
    fm = s["final_merge"]
    if fm and fm.get("scores"):
        lines.append(row("final merge", {**fm["scores"], "mean": fm["mean"]}))
    lines.append("")
    lines.append("archive  " + "  ".join(
        f"{t}: coverage {a['coverage']:.2f} best {a['best']:.3f}" for t, a in s["archives"].items()))
    return "\n".join(lines)
