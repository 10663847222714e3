"""A worker: child spec -> crossover -> mutation -> materialize -> evaluate on K tasks.

A worker keeps the base, the experts' task vectors, their SVD factors, one
engine and the K tasks resident; a child costs one pass over the weights,
streamed into the engine tensor by tensor, plus the evaluations, and no
checkpoint is read from disk. The factors live where the memory plan puts them
(``factors.device``): the engine's device when they fit there, else host memory. The same class runs
as a Ray actor (:mod:`cycleqd.evolve.pool`) or in process (tests, replay of one child).
Domain errors inside a child become a failed result; they never crash the run.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack
from typing import Any, Sequence

import torch

from cycleqd.config import Config, parse_config, resolve_paths, split_config
from cycleqd.registry import CROSSOVERS, ENGINES, MUTATIONS, TASKS
from cycleqd.search.child import ChildResult, ChildSpec

log = logging.getLogger("cycleqd")


def _short_error(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" ({tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


def make_child(spec: ChildSpec, parents: Sequence[Any], cfg: Config, factors: Any) -> tuple[Any, dict[str, float]]:
    """Crossover then mutation of ``parents`` (Genomes), all randomness from ``spec.seed``; or, for a
    spec with coefficients (cma_es, nsga2, random), the genome of that point of the box."""
    t0 = time.perf_counter()
    if spec.coefficients is not None:
        from cycleqd.search.space import coefficient_genome

        return coefficient_genome(spec.coefficients, cfg, factors), {"crossover": time.perf_counter() - t0}
    gen = torch.Generator().manual_seed(spec.seed)
    evo = cfg.evolution
    crossover, mutation = evo.crossover, evo.mutation
    if spec.operators is not None:  # chosen by operator control: w ~ N(1 + mu, |sigma|), r ~ U[0, rate)
        mu, sigma, rate = spec.operators
        crossover = crossover.model_copy(update={"mu": mu, "sigma": abs(sigma)})
        mutation = mutation.model_copy(update={"rate": rate})
    child = CROSSOVERS.get(evo.crossover.name)(parents, crossover, gen, factors)
    t1 = time.perf_counter()
    q = cfg.task_names.index(spec.quality_task)  # the expert whose directions mutate this child
    child = MUTATIONS.get(evo.mutation.name)(child, q, mutation, gen, factors)
    t2 = time.perf_counter()
    return child, {"crossover": t1 - t0, "mutation": t2 - t1}


def build_tasks(cfg: Config) -> dict[str, Any]:
    """Instantiate the configured tasks (name -> Task)."""
    from cycleqd.tasks.foreign import make_task  # a package's class is wrapped in the Task protocol

    return {t.name: make_task(t.kind, name=t.name, data=t.data, sandbox=cfg.sandbox, **t.options) for t in cfg.tasks}


def genome_only(cfg: Config) -> bool:
    """True when no task of ``cfg`` needs a model (``needs_model = False``): workers then load no engine.

    A package's class that does not derive from :class:`~cycleqd.tasks.protocol.Task` needs one."""
    from cycleqd.tasks.protocol import Task

    return all(issubclass(cls := TASKS.get(t.kind), Task) and not cls.needs_model for t in cfg.tasks)


def ready_config(cfg: Config, *, split: str | None = None, n: int | None = None, seed: int | None = None) -> Config:
    """The one recipe before a worker loads models: ``cfg`` on ``split`` (``n`` items drawn with
    ``seed``) when any is given, local paths made absolute, and the mini world built when the
    config names it (so every command works on a fresh clone).

    Raises:
        ConfigError: the split's options are not valid for a task (one line, nothing loaded).
    """
    if split is not None or n is not None or seed is not None:
        cfg = split_config(cfg, split or "val", n, seed)
    cfg = resolve_paths(cfg)
    if cfg.models.mini is not None:
        from cycleqd.mini.build import ensure_mini_world

        ensure_mini_world(cfg)
    return cfg


def local_worker(cfg: Config, *, split: str | None = None, n: int | None = None, seed: int | None = None
                 ) -> "ChildWorker":
    """A :class:`ChildWorker` in this process over :func:`ready_config`, using all of torch's threads."""
    return ChildWorker(ready_config(cfg, split=split, n=n, seed=seed), threads=torch.get_num_threads())


class ChildWorker:
    """Holds the resident tensors, one engine and the tasks; executes child specs.

    Args:
        cfg: the resolved experiment config (a Config or its dump).
        index: worker number, for logs.
        threads: torch CPU threads (default: cores / workers, at least 1).
    """

    def __init__(self, cfg: Config | dict, index: int = 0, threads: int | None = None):
        from cycleqd.model.factors import Factors
        from cycleqd.model.plan import factors_device

        self.cfg = cfg if isinstance(cfg, Config) else parse_config(cfg)
        self.index = index
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // self.cfg.evolution.workers)
        torch.set_num_threads(threads)
        if genome_only(self.cfg):  # every task scores the genome itself (kind: synthetic): no weights loaded
            from cycleqd.engine.genome_only import GenomeOnlyEngine

            self.engine = GenomeOnlyEngine()
        else:
            from cycleqd.engine.gather import adapter_engine_config

            engine_cls = ENGINES.get(self.cfg.engine.name)
            self.engine = engine_cls.from_path(self.cfg.models.base, adapter_engine_config(self.cfg),
                                               dtype=self.cfg.models.dtype)
        where = factors_device(self.cfg, self.engine.device)
        self.factors = Factors.prepare(self.cfg, device=where, progress=False).pin_memory()
        self.tasks = build_tasks(self.cfg)
        # the last evaluation's share of answers cut at max_new_tokens, per thread (children_per_worker)
        self._local = threading.local()
        self.gather = None  # children as adapters, several at once (LoRA experts, children_per_worker > 1)
        if self.cfg.evolution.children_per_worker > 1:
            from cycleqd.engine.gather import Gatherer

            self.gather = Gatherer(self.engine)

    @property
    def truncated(self) -> dict[str, float]:
        """Task -> share of answers cut at ``max_new_tokens`` in this thread's last evaluation."""
        return getattr(self._local, "truncated", {})

    @property
    def node(self) -> str | None:
        """The Ray node this worker runs on (None outside Ray): the ``node`` of its children's records."""
        import sys

        if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
            return None
        return sys.modules["ray"].get_runtime_context().get_node_id()

    def ping(self) -> int:
        return self.index

    def seed_genome(self, k: int) -> bytes:
        from cycleqd.model.genome import Genome

        return Genome.seed(k, self.factors).to_bytes()

    def evaluate(self, genome: Any, tasks: Sequence[str] | None = None) -> tuple[dict[str, float], dict[str, float]]:
        """Stream ``genome``'s weights into the engine and score it on every task (or only ``tasks``)."""
        scores, seconds, _ = self.evaluate_recorded(genome, tasks, record=False)
        return scores, seconds

    def _answer(self, name: str, engine: Any) -> Any:
        """Ask task ``name``'s answers of ``engine`` (the check comes later); notes the share of them cut at
        the token limit (an engine that cannot tell, such as a child's adapter view, notes none)."""
        before = (engine.answers_generated, engine.answers_truncated)
        check = self.tasks[name].answer(engine)
        n = engine.answers_generated - before[0]
        if engine.counts_truncation and n > 0:
            self.truncated[name] = (engine.answers_truncated - before[1]) / n
        return check

    def _checks(self) -> ThreadPoolExecutor:
        """This thread's one check thread, kept for the worker's life (not a new thread per child)."""
        pool = getattr(self._local, "checks", None)
        if pool is None:
            pool = self._local.checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cycleqd-check")
        return pool

    def evaluate_recorded(self, genome: Any, tasks: Sequence[str] | None = None, *, record: bool | None = None
                          ) -> tuple[dict[str, float], dict[str, float], list[dict]]:
        """:meth:`evaluate`, plus the passing samples' conversations when ``record`` (default:
        ``evolution.record_episodes``); see :func:`cycleqd.tasks.protocol.episodes_of`.

        A task that answers first and checks later (``answer``, as the mini tasks do) has its
        check run in a second thread while the engine generates for the next task; tasks whose
        checks run in sandbox processes go first, so those processes use a free core meanwhile.
        ``eval_<task>`` seconds are each task's generation plus its check.
        """
        from cycleqd.tasks.protocol import episodes_of

        record = self.cfg.evolution.record_episodes if record is None else record
        kinds = {t.name: t.kind for t in self.cfg.tasks}
        episodes: list[dict] = []

        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        engine, view = self.engine, None
        with ExitStack() as held:
            if self.gather is not None and not genome.terms:  # the child as an adapter beside the others
                from cycleqd.model.lora import child_adapter

                view = f"child-{uuid.uuid4().hex[:12]}"  # never a name an earlier child held
                engine = self.gather.enter(view, child_adapter(genome, self.factors, shared=True))
                held.callback(self.gather.leave, view)
            else:
                if self.gather is not None:  # a dense swap: the engine is this child's alone until it is scored
                    held.enter_context(self.gather.exclusive())
                with torch.no_grad():
                    self.engine.load_genome(genome, self.factors)
            seconds["materialize"] = time.perf_counter() - t0
            names = [n for n in self.tasks if tasks is None or n in tasks]
            self._local.truncated = {}
            results: dict[str, Any] = {}
            checks = self._checks()
            try:
                for name in sorted(names, key=lambda n: not self.tasks[n].executes_code):
                    results[name] = checks.submit(self._answer(name, engine))
            finally:  # the checks already submitted end before this child does, as it fails or not
                wait(list(results.values()))
            results = {n: r.result() for n, r in results.items()}
        scores = {}
        for name in names:
            res = results[name]
            scores[name] = float(res.quality)
            seconds[f"eval_{name}"] = float(res.seconds)
            if record:
                episodes += episodes_of(name, kinds[name], res)
        return scores, seconds, episodes

    def run(self, spec: ChildSpec, parents: Sequence[bytes]) -> ChildResult:
        """Build the child of ``spec`` from parent genome bytes and evaluate it."""
        from cycleqd.model.genome import Genome

        try:
            child, seconds = make_child(spec, [Genome.from_bytes(p) for p in parents], self.cfg, self.factors)
            scores, more, episodes = self.evaluate_recorded(child)
            return ChildResult(spec.id, child.to_bytes(), scores, {**seconds, **more}, None, self.index,
                               tuple(episodes) if self.cfg.evolution.record_episodes else None,
                               dict(self.truncated), self.node)
        except Exception as e:  # the worker boundary: a bad child is a logged failure
            log.warning("child %s failed:\n%s", spec.id, traceback.format_exc())  # the whole trace, in the worker's log
            return ChildResult(spec.id, None, {}, {}, _short_error(e), self.index)

    def run_many(self, items: Sequence[tuple[ChildSpec, Sequence[bytes]]]) -> list[ChildResult]:
        """:meth:`run` of several specs at once, one thread each (with LoRA experts and
        ``children_per_worker`` > 1 their generation calls share batches); results in order."""
        with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
            return list(pool.map(lambda it: self.run(*it), items))

    def run_genome(self, genome_id: str, data: bytes) -> ChildResult:
        """Evaluate a given genome (seed experts, the final merge)."""
        from cycleqd.model.genome import Genome

        try:
            scores, seconds, episodes = self.evaluate_recorded(Genome.from_bytes(data))
            return ChildResult(genome_id, data, scores, seconds, None, self.index,
                               tuple(episodes) if self.cfg.evolution.record_episodes else None,
                               dict(self.truncated))
        except Exception as e:
            return ChildResult(genome_id, None, {}, {}, _short_error(e), self.index)
