"""`make bench-scale`: how children per hour grow with workers, and what the driver itself sustains.

Two parts, both with ``kind: synthetic`` children (genome-only: no engine, quality from the
genome, :mod:`cycleqd.tasks.synthetic`) over the tiny mini world, through the real loop
(:func:`cycleqd.evolve.loop.run_loop`, the run folder, the plot observer):

* driver: zero-latency children, in process (:class:`~cycleqd.evolve.pool.LocalPool`) and on
  Ray (:class:`~cycleqd.evolve.pool.RayPool`); per-child driver time (from a finished child
  back to waiting for the next: tell, commit, observers, ask, submit) at p50 / p99 over the
  children around 1,000 and around 10,000, children per second, driver RSS at start and end;
* scaling: children with a fixed latency (default 2 s) on N = 1, 2, 4, ... 32 workers spread
  over a cluster of a head and 3 nodes, each in its own network namespace
  (:mod:`cycleqd.evolve.cluster`; skipped, with the reason, where namespaces cannot be made),
  the driver in the head's namespace; children per hour and efficiency ``rate(N) / (N x rate(1))``;
  N capped by the memory available (the key of the largest N asked is then ``null``).

Results are merged into bench.json (other keys kept); a plot of children per hour against
workers goes to docs/img/scaling.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def rss_mb() -> float:
    """This process's resident memory (MiB), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def synthetic_config(generations: int, workers: int, latency_s: float, root: Path, *,
                     worker_cpus: float = 1.0, name: str = "bench") -> Any:
    """The dry-run config (experiments/dry_run.yaml) with ``latency_s``, ``workers``, ``generations``."""
    import yaml

    from cycleqd.config import parse_config, resolve_paths

    data = yaml.safe_load((ROOT / "experiments" / "dry_run.yaml").read_text())
    data["name"] = name
    for t in data["tasks"]:
        t["options"]["latency_s"] = latency_s
    data["evolution"].update(generations=generations, workers=workers, worker_cpus=worker_cpus, final_merge=False)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the config's paths are relative to the repository
    try:
        return resolve_paths(parse_config(data))
    finally:
        os.chdir(cwd)


class TimedPool:
    """A pool wrapper that times the driver: from ``wait()`` returning a child to the next ``wait()`` call."""

    def __init__(self, pool: Any, rss_at: tuple[int, ...] = (100, 1000)):
        self.pool, self.driver_s, self.driver_cpu_s, self._back = pool, [], [], None
        self.rss_at, self.rss = set(rss_at), {}

    def free(self):
        return self.pool.free()

    def submit(self, slot, spec, parents):
        return self.pool.submit(slot, spec, parents)

    def wait(self, timeout=None):
        now, cpu = time.perf_counter(), time.thread_time()
        if self._back is not None:
            self.driver_s.append(now - self._back[0])
            self.driver_cpu_s.append(cpu - self._back[1])
            self._back = None
            if len(self.driver_s) in self.rss_at:
                self.rss[len(self.driver_s)] = rss_mb()
        got = self.pool.wait(timeout)
        if got is not None:
            self._back = (time.perf_counter(), time.thread_time())
        return got

    def seed_genomes(self, k):
        return self.pool.seed_genomes(k)

    def run_genomes(self, genomes):
        return self.pool.run_genomes(genomes)

    def cancel(self):
        return self.pool.cancel()


def _pct(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.array(xs), q)) if xs else float("nan")


def driver_ceiling(n: int = 10_000, *, on_ray: bool = False, workers: int = 2, root: Path | None = None) -> dict:
    """Zero-latency synthetic children through the real loop; the driver's own cost per child."""
    from cycleqd.evolve.loop import _ready_models
    from cycleqd.evolve.pool import LocalPool, RayPool, start_ray
    from cycleqd.evolve.worker import ChildWorker
    from cycleqd.runs.store import RunStore
    from cycleqd.views.plots import PlotObserver

    made = root is None
    root = Path(root or tempfile.mkdtemp(prefix="cycleqd-driver-"))
    cfg = synthetic_config(n, workers, 0.0, root, worker_cpus=0.5 if on_ray else 1.0)
    _ready_models(cfg)
    store = RunStore.create(root / ("ray" if on_ray else "local"), cfg)
    if on_ray:
        ray = start_ray(None)
        inner = RayPool(ray, cfg, workers)
    else:
        inner = LocalPool([ChildWorker(cfg, index=i, threads=1) for i in range(workers)])
    pool = TimedPool(inner)
    from cycleqd.evolve.loop import run_loop

    t0 = time.perf_counter()
    plots = PlotObserver()
    run_loop(store, pool, [plots])
    wall = time.perf_counter() - t0
    rss1 = rss_mb()
    if on_ray:
        ray.shutdown()
    d = pool.driver_s
    ms = [x * 1000 for x in d]
    cpu_ms = [x * 1000 for x in pool.driver_cpu_s]
    # memory after the first 100 children (plots, caches and the archives' arrays set up) and at the end
    out = {"children": len(d), "children_per_second": round(len(d) / wall, 1),
           "driver_ms_mean": round(sum(ms) / len(ms), 3), "driver_cpu_ms_mean": round(sum(cpu_ms) / len(cpu_ms), 3),
           "rss_mb_start": round(pool.rss.get(100, float("nan")), 1),
           "rss_mb_at_1000": round(pool.rss.get(1000, float("nan")), 1),
           "rss_mb_end": round(rss1, 1), "load_average": round(os.getloadavg()[0], 1), "cores": os.cpu_count()}
    for at in (1000, 10_000):
        if len(ms) >= at - 1:  # the last child's driver time ends with the run: n children give n - 1
            window = ms[max(0, at - 500):at]  # the 500 children before the mark
            out[f"p50_ms_at_{at}"] = round(_pct(window, 50), 3)
            out[f"p99_ms_at_{at}"] = round(_pct(window, 99), 3)
            out[f"cpu_p99_ms_at_{at}"] = round(_pct(cpu_ms[max(0, at - 500):at], 99), 3)
    out["run_dir_mb"] = round(sum(f.stat().st_size for f in store.path.rglob("*") if f.is_file()) / 2**20, 1)
    plots.wait()  # a drawing in the background still reads the folder
    if made:
        shutil.rmtree(root, ignore_errors=True)
    return out


def actor_memory_mb(namespaces: list[str]) -> dict:
    """Memory of the cluster's genome-only worker actors (``ray::ChildWorker`` processes in its network
    ``namespaces``): mean RSS and PSS (shared pages split among the processes sharing them), MiB, from /proc."""
    inodes = set()
    for ns in namespaces:
        try:
            inodes.add(os.stat(f"/run/netns/{ns}").st_ino)
        except OSError:
            pass
    rss, pss = [], []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if not (d / "cmdline").read_bytes().startswith(b"ray::ChildWorker"):
                continue
            if os.stat(d / "ns" / "net").st_ino not in inodes:
                continue
            rollup = (d / "smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        vals = {line.split()[0]: int(line.split()[1]) for line in rollup[1:] if len(line.split()) >= 2}
        rss.append(vals.get("Rss:", 0) / 1024)
        pss.append(vals.get("Pss:", 0) / 1024)
    if not rss:
        return {"actors": 0}
    return {"actors": len(rss), "rss_mb_mean": round(sum(rss) / len(rss), 1), "pss_mb_mean": round(sum(pss) / len(pss), 1)}


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scaling_driver(address: str, workers: tuple[int, ...], latency_s: float, rounds: int, root: Path,
                   namespaces: list[str]) -> dict:
    """The driver's side of :func:`scaling`, run where a driver joins the cluster (the head's namespace).

    ``max(workers)`` actors are started once; each N runs ``(rounds + 1) x N`` children through the
    real loop on the first N of them. The rate counts the children finished after the N-th, over the
    time from the N-th finish to the last (the first N include the actors' first call).
    """
    import copy

    from cycleqd.evolve.loop import _ready_models, run_loop
    from cycleqd.evolve.pool import RayPool, start_ray
    from cycleqd.runs.store import RunStore

    top = max(workers)
    ray = start_ray(address)
    base_cfg = synthetic_config(top, top, latency_s / 3, root, name="scale")
    _ready_models(base_cfg)
    t0 = time.perf_counter()
    big = RayPool(ray, base_cfg, top)  # every actor started once, in parallel
    out: dict = {"actors_start_s": round(time.perf_counter() - t0, 1), "per_n": {}}
    out["actor_memory"] = actor_memory_mb(namespaces)
    for n in workers:
        cfg = synthetic_config((rounds + 1) * n, n, latency_s / 3, root, name=f"scale{n}")
        store = RunStore.create(root / f"n{n}", cfg)
        inner = copy.copy(big)
        inner.cfg, inner.actors, inner.inflight = cfg, big.actors[:n], {}
        finished: list[float] = []

        class Clock(TimedPool):
            def wait(self, timeout=None):
                got = super().wait(timeout)
                if got is not None:
                    finished.append(time.perf_counter())
                return got

        t0 = time.perf_counter()
        try:
            run_loop(store, Clock(inner), [])
        except Exception as e:  # noqa: BLE001 - e.g. Ray's memory monitor killing workers: keep the smaller N
            out["stopped"] = f"N={n}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"scaling: {out['stopped']}", flush=True)
            break
        wall = time.perf_counter() - t0
        done = finished  # children only (the seed experts go through run_genomes)
        rate = (len(done) - n) / (done[-1] - done[n - 1]) if len(done) > n else float("nan")
        nodes = {c.node for c in store.children()}
        out["per_n"][str(n)] = {"children": len(done), "wall_s": round(wall, 1),
                                "children_per_hour": round(rate * 3600, 1), "nodes_used": len(nodes),
                                "load_average": round(os.getloadavg()[0], 1)}
        print(f"scaling: N={n}: {out['per_n'][str(n)]}", flush=True)
    ray.shutdown()
    return out


def scaling(workers: tuple[int, ...] = (1, 2, 4, 8, 16, 32), latency_s: float = 2.0, rounds: int = 6,
            root: Path | None = None) -> dict:
    """Children per hour on N workers spread over a cluster of a head (0 CPUs) and 3 nodes, each in
    its own network namespace (:mod:`cycleqd.evolve.cluster`), ``latency_s`` a child.

    The driver runs in the head's namespace (a subprocess: :func:`scaling_driver`). Where network
    namespaces cannot be made, the scaling part is skipped and the reason recorded. N is capped so
    that the actors fit in the memory available (about ``ACTOR_MB`` each).
    """
    import subprocess

    from cycleqd.evolve.cluster import LoopbackCluster, netns_available

    why = netns_available()
    if why is not None:
        return {"skipped": f"network namespaces unavailable: {why}"}
    made = root is None
    root = Path(root or tempfile.mkdtemp(prefix="cycleqd-scale-"))
    avail = mem_available_mb()
    fit = int((avail - 3072) // ACTOR_MB)  # 3 GiB left to the rest of the machine
    capped = tuple(n for n in workers if n <= fit) or (1,)
    top = max(capped)
    per_node = [-(-top // 3)] * 3
    out: dict = {"latency_s": latency_s, "nodes": 4, "rounds": rounds, "mem_available_mb": round(avail),
                 "load_average_start": round(os.getloadavg()[0], 1)}
    if capped != tuple(workers):
        out["capped"] = f"N up to {top}: {avail:.0f} MiB available, about {ACTOR_MB} MiB per worker actor"
    cluster = LoopbackCluster(Path("/tmp") / f"cqs{os.getpid()}", head_cpus=0, node_cpus=tuple(per_node), netns=True)
    try:
        cluster.start()
        res_file = root / "scaling.json"
        cmd = cluster.command([sys.executable, str(Path(__file__).resolve()), "--scaling-driver", cluster.address,
                               "--workers", ",".join(map(str, capped)), "--latency", str(latency_s),
                               "--rounds", str(rounds), "--netns", ",".join(cluster.namespaces),
                               "--out", str(res_file)])
        subprocess.run(cmd, env=cluster.env, check=True, cwd=ROOT)
        out.update(json.loads(res_file.read_text()))
    finally:
        cluster.stop()
        cluster.remove_files()
        if made:
            shutil.rmtree(root, ignore_errors=True)
    r1 = out["per_n"][str(min(capped))]["children_per_hour"] / min(capped)
    for n, row in out["per_n"].items():
        row["efficiency"] = round(row["children_per_hour"] / (int(n) * r1), 3)
    return out


ACTOR_MB = 300  # a genome-only worker actor's memory (PSS 200 MiB measured: actor_memory in bench.json), with room


def plot_scaling(res: dict, path: Path) -> None:
    """children per hour against workers, with the ideal line, to ``path`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ns = sorted(int(n) for n in res["per_n"])
    rates = [res["per_n"][str(n)]["children_per_hour"] for n in ns]
    fig = Figure(figsize=(5, 3.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(ns, rates, "o-", label="measured")
    ax.plot(ns, [rates[0] * n / ns[0] for n in ns], "--", color="grey", label="ideal (N x rate(1))")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("workers (Ray actors over 4 nodes, one netns each)", fontsize=9)
    ax.set_ylabel("children per hour")
    ax.set_title(f"synthetic children, {res['latency_s']:g} s each", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--children", type=int, default=10_000)
    ap.add_argument("--only", choices=["driver", "scaling"])
    ap.add_argument("--no-ray-driver", action="store_true", help="driver ceiling in process only")
    ap.add_argument("--max-workers", type=int, default=32)
    ap.add_argument("--latency", type=float, default=2.0, help="seconds per synthetic child")
    ap.add_argument("--rounds", type=int, default=6, help="scaling: (rounds + 1) x N children per N")
    ap.add_argument("--scaling-driver", metavar="ADDRESS", help=argparse.SUPPRESS)  # the inner driver (see scaling)
    ap.add_argument("--workers", help=argparse.SUPPRESS)
    ap.add_argument("--netns", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.scaling_driver:
        r = scaling_driver(args.scaling_driver, tuple(int(n) for n in args.workers.split(",")), args.latency,
                           args.rounds, Path(args.out).parent, args.netns.split(","))
        Path(args.out).write_text(json.dumps(r))
        return 0
    res: dict = {}
    if args.only in (None, "driver"):
        res["driver_local"] = driver_ceiling(args.children)
        print("driver, in process:", res["driver_local"], flush=True)
        if not args.no_ray_driver:
            res["driver_ray"] = driver_ceiling(args.children, on_ray=True)
            print("driver, on Ray:", res["driver_ray"], flush=True)
    if args.only in (None, "scaling"):
        ws = tuple(n for n in (1, 2, 4, 8, 16, 32) if n <= args.max_workers)
        res["scaling"] = scaling(ws, args.latency, args.rounds)
        if "per_n" in res["scaling"]:
            plot_scaling(res["scaling"], ROOT / "docs" / "img" / "scaling.png")
    out_path = Path(args.out)
    data = json.loads(out_path.read_text()) if out_path.is_file() else {}
    data["scale"] = {**data.get("scale", {}), **res}
    if "driver_local" in res:
        dl = res["driver_local"]
        data["driver_children_per_second"] = dl["children_per_second"]
        data["driver_p99_ms_at_1000"] = dl.get("p99_ms_at_1000")
        data["driver_p99_ms_at_10000"] = dl.get("p99_ms_at_10000")
    if "driver_ray" in res:
        data["driver_ray_children_per_second"] = res["driver_ray"]["children_per_second"]
    if "per_n" in res.get("scaling", {}):
        per = res["scaling"]["per_n"]
        for k in [k for k in data if k.startswith("scaling_efficiency_") or k == "scaling_capped"]:
            del data[k]  # a previous run's
        top = max(per, key=int)
        data[f"scaling_efficiency_{top}"] = per[top]["efficiency"]
        if str(max(ws)) not in per:  # capped by memory: the key is there, with why it has no figure
            data[f"scaling_efficiency_{max(ws)}"] = None
            data["scaling_capped"] = res["scaling"].get("capped") or res["scaling"].get("stopped")
        data["children_per_hour"] = {n: row["children_per_hour"] for n, row in per.items()}
    out_path.write_text(json.dumps(data, indent=2))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
