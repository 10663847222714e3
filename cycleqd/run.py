"""evolve / resume: the CycleQD loop, top to bottom.

seed experts -> (per child) pick the quality task -> sample parents from its
archive -> a worker does crossover, mutation, materialize, evaluation on K tasks
-> offer to all K archives -> log, snapshot, plots -> final merge.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cycleqd.archive import Archive
from cycleqd.config import Config, ConfigError, dump_config, parse_config, resolve_paths
from cycleqd.registry import SAMPLERS
from cycleqd.store import RunStore, check_models, default_run_dir, write_atomic
from cycleqd.worker import ChildResult, ChildSpec, ChildWorker

log = logging.getLogger("cycleqd")

PLOT_EVERY = 10
MAX_RETRIES = 3


def local_ray_env() -> None:
    """Keep a local Ray on loopback, without usage stats; token auth off unless the user chose."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def start_ray(address: str | None) -> Any:
    """Join ``address`` (or RAY_ADDRESS, as under `ray job submit`), else start Ray on 127.0.0.1."""
    local_ray_env()
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            address="local",  # a new private Ray, even if another cluster runs on this machine
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            num_cpus=max(2, os.cpu_count() or 1),
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    return ray


def quality_task(cfg: Config, index: int) -> str:
    """The task whose archive child ``index`` (0-based) is drawn from: rotates every flip_interval."""
    if cfg.evolution.fixed_quality_task:
        return cfg.evolution.fixed_quality_task
    k = len(cfg.tasks)
    return cfg.task_names[(index // cfg.evolution.flip_interval) % k]


def child_seed(cfg: Config, index: int) -> int:
    return int(np.random.SeedSequence([cfg.seed, index]).generate_state(1)[0])


def ask(cfg: Config, archive: Archive, index: int) -> ChildSpec:
    """The spec of child ``index``: quality task, parents drawn from its archive, seed."""
    q_name = quality_task(cfg, index)
    rng = np.random.default_rng([cfg.seed, index, 1])
    sampler = SAMPLERS.get(cfg.evolution.sampling.name)
    parents = sampler(archive.elites(q_name), 2, cfg.evolution.sampling, rng)
    return ChildSpec(
        index=index,
        id=f"g{index + 1:06d}",
        quality_task=q_name,
        q=cfg.task_names.index(q_name),
        parents=tuple(p.genome for p in parents),
        seed=child_seed(cfg, index),
    )


class _Pool:
    """N Ray actors with at most one child each in flight; dead actors are replaced."""

    def __init__(self, ray: Any, cfg: Config, n: int):
        self.ray, self.cfg = ray, cfg
        self.remote = ray.remote(num_cpus=cfg.evolution.worker_cpus, num_gpus=cfg.evolution.worker_gpus)(ChildWorker)
        self.actors = [self._new(i) for i in range(n)]
        ray.get([a.ping.remote() for a in self.actors])
        self.inflight: dict[Any, tuple[int, Callable[[Any], Any], Any]] = {}

    def _new(self, i: int) -> Any:
        return self.remote.remote(self.cfg.model_dump(mode="json"), i)

    def free(self) -> list[int]:
        busy = {slot for slot, _, _ in self.inflight.values()}
        return [i for i in range(len(self.actors)) if i not in busy]

    def submit(self, slot: int, call: Callable[[Any], Any], tag: Any) -> None:
        self.inflight[call(self.actors[slot])] = (slot, call, tag)

    def wait(self) -> tuple[Any, Any]:
        """Next finished (tag, result); an actor that died is replaced and its call re-sent."""
        tries = 0
        while True:
            done, _ = self.ray.wait(list(self.inflight), num_returns=1)
            slot, call, tag = self.inflight.pop(done[0])
            try:
                return tag, self.ray.get(done[0])
            except self.ray.exceptions.RayActorError as e:
                tries += 1
                if tries > MAX_RETRIES * len(self.actors):
                    raise RuntimeError(f"workers keep dying: {e}") from e
                log.warning("worker %d died (%s); starting a new one", slot, type(e).__name__)
                self.actors[slot] = self._new(slot)
                self.submit(slot, call, tag)

    def map(self, calls: list[tuple[Callable[[Any], Any], Any]]) -> dict[Any, Any]:
        """Run calls over free actors, returning {tag: result}."""
        out, todo = {}, list(calls)
        while todo or self.inflight:
            for slot in self.free():
                if todo:
                    call, tag = todo.pop(0)
                    self.submit(slot, call, tag)
            tag, res = self.wait()
            out[tag] = res
        return out


def _refresh_plots(store: RunStore) -> None:
    try:
        from cycleqd.plots import refresh_plots

        refresh_plots(store.path)
    except Exception as e:  # plots never stop a run
        log.warning("plots not refreshed: %s", e)


def _stats_line(archive: Archive, generation: int) -> dict:
    return {"generation": generation, "archives": {t: archive.stats(t) for t in archive.tasks}}


def evolve(cfg: Config, run_dir: str | os.PathLike | None = None, *, address: str | None = None,
           progress: bool = True) -> Path:
    """Start a new run of ``cfg`` in ``run_dir`` (default archives/<name>-<time>) and drive it."""
    cfg = resolve_paths(cfg)
    store = RunStore.create(run_dir or default_run_dir(cfg), cfg)
    return drive(store, address=address, progress=progress)


def resume(run_dir: str | os.PathLike, *, generations: int | None = None, address: str | None = None,
           progress: bool = True) -> Path:
    """Continue a run (after a crash or to more generations) from its log."""
    store = RunStore(run_dir)
    if generations is not None:
        if generations < 0:
            raise ConfigError(f"--generations must be >= 0, got {generations}")
        data = store.config().model_dump()
        data["evolution"]["generations"] = generations
        write_atomic(store.path / RunStore.CONFIG, dump_config(parse_config(data)))
    return drive(store, address=address, progress=progress)


def drive(store: RunStore, *, address: str | None = None, progress: bool = True) -> Path:
    """The loop. Everything it needs is in the run folder, so it is also the resume path."""
    from tqdm import tqdm

    cfg = store.config()
    tasks, bins = cfg.task_names, {t.name: t.bins for t in cfg.tasks}
    target = cfg.evolution.generations

    # The mini world is built on first use, so `make evolve` works on a fresh clone.
    if cfg.models.mini is not None:
        from cycleqd.mini.build import ensure_mini_world

        ensure_mini_world(cfg)
    check_models(store, cfg)

    # Task vectors and SVD factors once, on the driver, into the shared cache;
    # the workers then load them instead of racing to compute them.
    from cycleqd.factors import warm_cache

    warm_cache(cfg, progress=progress)

    # Archives are a pure function of the seeds and the log: rebuild them.
    seeds, children = store.seeds(), store.children()
    history = [(s["genome"], s["scores"], 0) for s in seeds.values()]
    history += [(c["id"], c["scores"], c["generation"]) for c in children if c.get("error") is None]
    archive = Archive.replay(tasks, bins, history)
    finished = len(children)
    next_index = max((c["generation"] for c in children), default=0)

    ray = start_ray(address)
    pool = _Pool(ray, cfg, cfg.evolution.workers)

    # Generation 0: the seed experts, evaluated like any child.
    if len(seeds) < len(tasks):
        genomes = ray.get([pool.actors[0].seed_genome.remote(k) for k in range(len(tasks))])
        results = pool.map([
            ((lambda a, i=f"seed_{t}", g=g: a.run_genome.remote(i, g)), t) for t, g in zip(tasks, genomes)
        ])
        for t in tasks:
            r: ChildResult = results[t]
            if r.error:
                raise RuntimeError(f"seed expert {t} could not be evaluated: {r.error}")
            store.save_genome(r.id, r.genome)
            seeds[t] = {"genome": r.id, "scores": dict(r.scores)}
            archive.offer(r.id, r.scores, 0)
        store.save_seeds(seeds)
        store.write_archives(archive.to_json(finished))
        store.append_stats(_stats_line(archive, 0))
        _refresh_plots(store)

    # Steady state: every worker always has one child in flight; a finished child
    # is offered to all K archives and logged before the next one is asked.
    bar = tqdm(total=target, initial=min(finished, target), desc="generations", disable=not progress,
               dynamic_ncols=True)
    parent_cache: dict[str, bytes] = {}

    def genome_bytes(gid: str) -> bytes:
        if gid not in parent_cache:
            if len(parent_cache) > 256:
                parent_cache.clear()
            parent_cache[gid] = store.genome_path(gid).read_bytes()
        return parent_cache[gid]

    asked = finished
    while finished < target:
        for slot in pool.free():
            if asked >= target:
                break
            spec = ask(cfg, archive, next_index)
            parents = [genome_bytes(p) for p in spec.parents]
            pool.submit(slot, (lambda a, s=spec, p=parents: a.run.remote(s, p)), spec)
            next_index += 1
            asked += 1
        spec, res = pool.wait()
        t0 = time.perf_counter()
        inserted: list[str] = []
        if res.error is None:
            store.save_genome(spec.id, res.genome)
            parent_cache[spec.id] = res.genome
            inserted = archive.offer(spec.id, res.scores, spec.index + 1)
        else:
            log.warning("child %s failed: %s", spec.id, res.error)
        finished += 1
        store.append_child({
            "generation": spec.index + 1,
            "id": spec.id,
            "quality_task": spec.quality_task,
            "parents": list(spec.parents),
            "scores": dict(res.scores),
            "inserted": inserted,
            "seconds": {**res.seconds, "store": time.perf_counter() - t0},
            "seed": spec.seed,
            "worker": res.worker,
            "error": res.error,
        })
        store.write_archives(archive.to_json(finished))
        store.append_stats(_stats_line(archive, finished))
        best = {t: archive.stats(t)["best"] for t in tasks}
        bar.set_postfix({t: f"{v:.2f}" for t, v in best.items()}, refresh=False)
        bar.update(1)
        if finished % PLOT_EVERY == 0:
            _refresh_plots(store)
    bar.close()
    # children asked beyond the target (none in steady state) are simply dropped
    for ref in list(pool.inflight):
        ray.cancel(ref, force=True)
    pool.inflight.clear()

    # The paper's last step: one model from the archives' best elites, beta = softmax(quality).
    if cfg.evolution.final_merge and (store.final_merge() or {}).get("generation") != finished:
        final_merge(store, archive, pool, finished)
    _refresh_plots(store)
    summarize(store)
    return store.path


def final_merge(store: RunStore, archive: Archive, pool: _Pool, generation: int) -> dict:
    """theta = theta_base + sum_k beta_k tau_k over the best elite of each archive; beta = softmax(f)."""
    from cycleqd.genome import Genome

    best = [max(archive.elites(t), key=lambda e: e.quality) for t in archive.tasks]
    f = np.array([e.quality for e in best])
    beta = np.exp(f - f.max())
    beta = beta / beta.sum()
    merged = Genome.combine([store.load_genome(e.genome) for e in best], [float(b) for b in beta])
    results = pool.map([((lambda a, g=merged.to_bytes(): a.run_genome.remote("final_merge", g)), "final")])
    r: ChildResult = results["final"]
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
    """The run at a glance: per-archive stats, the best-mean elite, the seed experts, the final merge.

    Written to RUN/summary.json at the end of every evolve / resume.
    """
    snap = store.archives()
    tasks = snap["tasks"]
    elites = [e for a in snap["archives"].values() for e in a["elites"]]
    mean = lambda s: float(np.mean([s[t] for t in tasks]))  # noqa: E731
    best = max(elites, key=lambda e: mean(e["scores"]), default=None)
    out = {
        "generation": snap["generation"],
        "archives": {t: {k: snap["archives"][t][k] for k in ("coverage", "qd_score", "best")} for t in tasks},
        "experts": {t: {**s["scores"], "mean": mean(s["scores"])} for t, s in store.seeds().items()},
        "best_mean": None if best is None else {"genome": best["genome"], **best["scores"],
                                                "mean": mean(best["scores"])},
        "final_merge": store.final_merge(),
    }
    write_atomic(store.path / "summary.json", json.dumps(out, indent=1))
    return out


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
