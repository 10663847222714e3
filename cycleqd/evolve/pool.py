"""Pools of ChildWorkers the evolve loop hands child specs to.

:class:`RayPool` runs N Ray actors with at most one child each in flight and
replaces actors that die; :class:`LocalPool` runs ChildWorkers in this process,
one call at a time, so the loop runs without Ray (unit tests, debugging). Both
offer the same small interface: ``free()``, ``submit()``, ``wait()``,
``run_genomes()``, ``seed_genomes()``, ``cancel()``.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Sequence

from cycleqd.config import Config

if TYPE_CHECKING:  # the worker imports torch; the CLI imports this module before any heavy work
    from cycleqd.evolve.worker import ChildWorker
    from cycleqd.search.child import ChildResult, ChildSpec

log = logging.getLogger("cycleqd")

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


class LocalPool:
    """ChildWorkers in this process: ``wait()`` runs the oldest submitted child to completion.

    Args:
        workers: the in-process workers (one per slot).
    """

    def __init__(self, workers: Sequence["ChildWorker"]):
        self.workers = list(workers)
        self._pending: list[tuple[int, ChildSpec, list[bytes]]] = []

    def free(self) -> list[int]:
        busy = {slot for slot, _, _ in self._pending}
        return [i for i in range(len(self.workers)) if i not in busy]

    def submit(self, slot: int, spec: ChildSpec, parents: list[bytes]) -> None:
        self._pending.append((slot, spec, parents))

    def wait(self, timeout: float | None = None) -> tuple[ChildSpec, ChildResult] | None:
        """The next finished (spec, result); None when nothing is in flight."""
        if not self._pending:
            return None
        slot, spec, parents = self._pending.pop(0)
        return spec, self.workers[slot].run(spec, parents)

    def seed_genomes(self, k: int) -> list[bytes]:
        return [self.workers[0].seed_genome(i) for i in range(k)]

    def run_genomes(self, genomes: dict[str, bytes]) -> dict[str, ChildResult]:
        return {gid: self.workers[0].run_genome(gid, g) for gid, g in genomes.items()}

    def cancel(self) -> list[ChildSpec]:
        dropped = [spec for _, spec, _ in self._pending]
        self._pending.clear()
        return dropped


class RayPool:
    """N Ray actors of :class:`ChildWorker`; an actor that dies is replaced and its child re-sent.

    Args:
        ray: the imported, initialised ``ray`` module.
        cfg: the resolved config (sent to every actor).
        n: number of actors.
    """

    def __init__(self, ray: Any, cfg: Config, n: int):
        from cycleqd.evolve.worker import ChildWorker

        self.ray, self.cfg = ray, cfg
        # children_per_worker seats per actor: its concurrent run() calls share one engine as adapters
        self.per = cfg.evolution.children_per_worker
        self.remote = ray.remote(num_cpus=cfg.evolution.worker_cpus, num_gpus=cfg.evolution.worker_gpus,
                                 max_concurrency=self.per)(ChildWorker)
        self.actors = [self._new(i) for i in range(n)]
        ray.get([a.ping.remote() for a in self.actors])
        self.inflight: dict[Any, tuple[int, str, tuple, Any]] = {}
        self._tries = 0

    def _new(self, i: int) -> Any:
        return self.remote.remote(self.cfg.model_dump(mode="json"), i)

    def free(self) -> list[int]:
        busy = {slot for slot, _, _, _ in self.inflight.values()}
        return [i for i in range(len(self.actors) * self.per) if i not in busy]

    def _send(self, slot: int, method: str, args: tuple, tag: Any) -> None:
        ref = getattr(self.actors[slot // self.per], method).remote(*args)
        self.inflight[ref] = (slot, method, args, tag)

    def submit(self, slot: int, spec: ChildSpec, parents: list[bytes]) -> None:
        self._send(slot, "run", (spec, parents), spec)

    def wait(self, timeout: float | None = None) -> tuple[Any, ChildResult] | None:
        """Next finished (tag, result), or None after ``timeout`` seconds with nothing finished."""
        while self.inflight:
            done, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
            if not done:
                return None
            slot, method, args, tag = self.inflight.pop(done[0])
            try:
                return tag, self.ray.get(done[0])
            except self.ray.exceptions.RayActorError as e:
                self._tries += 1
                if self._tries > MAX_RETRIES * len(self.actors):
                    raise RuntimeError(f"workers keep dying: {e}") from e
                i = slot // self.per
                log.warning("worker %d died (%s); starting a new one", i, type(e).__name__)
                try:
                    self.ray.get(self.actors[i].ping.remote())  # another seat's error replaced it already?
                except self.ray.exceptions.RayActorError:
                    self.actors[i] = self._new(i)
                self._send(slot, method, args, tag)
        return None

    def _map(self, calls: list[tuple[str, tuple, Any]]) -> dict[Any, ChildResult]:
        out, todo = {}, list(calls)
        while todo or self.inflight:
            for slot in self.free():
                if todo:
                    method, args, tag = todo.pop(0)
                    self._send(slot, method, args, tag)
            got = self.wait()
            if got is not None:
                out[got[0]] = got[1]
        return out

    def seed_genomes(self, k: int) -> list[bytes]:
        return self.ray.get([self.actors[0].seed_genome.remote(i) for i in range(k)])

    def run_genomes(self, genomes: dict[str, bytes]) -> dict[str, ChildResult]:
        return self._map([("run_genome", (gid, g), gid) for gid, g in genomes.items()])

    def cancel(self) -> list[ChildSpec]:
        """Stop every child in flight (their actors are killed; a resume asks them again)."""
        dropped = []
        for ref, (slot, _, _, tag) in list(self.inflight.items()):
            try:
                self.ray.kill(self.actors[slot // self.per], no_restart=True)
            except Exception:  # the actor is gone already
                pass
            dropped.append(tag)
        self.inflight.clear()
        return dropped
