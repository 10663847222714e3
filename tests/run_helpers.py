"""Helpers several test modules share: a finished run folder, the CLI in a fresh process, a scripted engine."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pytest

from cycleqd.engine.protocol import Engine, GenRequest

_RUNS: dict[tuple, Path] = {}

# A random tiny Llama with a 64-token vocabulary scores likelihood ~ 1/64 on any text; the
# experts move it by a few percent, so the bins span that neighbourhood.
BINS = {"lo": 0.0150, "hi": 0.0165, "count": 6}
TEXTS = {
    "a": ["def f(x): return x + 1", "print(sorted(xs))", "for i in range(3): pass"],
    "b": ["select name from users where id = 3", "insert into t values (1)", "select count(*) from t"],
    "c": ["ls -la /tmp", "cat a.txt | grep x", "echo hi > out.txt"],
    "d": ["the cat sat on the mat", "a b c d e f", "hello world again"],
}


def real_run(tmp_path_factory: pytest.TempPathFactory, tasks: str = "abc", generations: int = 8,
             workers: int = 2, in_process: bool = True) -> Path:
    """A finished run folder (cached per process). ``in_process``: ``evolve`` with one worker in this
    process, without Ray (the tests of the views and the run folder need a run, not Ray); else on Ray."""
    key = (tasks, generations, workers, in_process)
    if key in _RUNS:
        return _RUNS[key]
    from tiny_models import make_tiny_family

    from cycleqd.config import parse_config
    from cycleqd.evolve.loop import evolve
    from cycleqd.views.plots import PlotObserver

    root = tmp_path_factory.mktemp(f"run_{tasks}")
    family = make_tiny_family(root / "family", tasks=tuple(tasks))
    data = {}
    for t in tasks:
        p = root / f"{t}.txt"
        p.write_text("\n".join(TEXTS[t]) + "\n")
        data[t] = str(p)
    cfg = parse_config({
        "name": f"test-{tasks}",
        "seed": 3,
        "models": {"base": str(family["base"]), "experts": {t: str(family[t]) for t in tasks}},
        "tasks": [{"name": t, "kind": "likelihood", "data": data[t], "bins": BINS} for t in tasks],
        "evolution": {"generations": generations, "workers": workers},
        "engine": {"device": "cpu"},
        "prepare_cache": str(root / "cache"),
    })
    if in_process:  # `cycleqd evolve --in-process`: the loop, the final merge and the summary, without Ray
        _RUNS[key] = evolve(cfg, root / "run", progress=False, observers=[PlotObserver()], in_process=True)
        return _RUNS[key]
    local_ray()
    _RUNS[key] = evolve(cfg, root / "run", progress=False, observers=[PlotObserver()])
    return _RUNS[key]


def local_ray() -> None:
    """A private local Ray, even when another cluster on this machine was started with `ray start`."""
    from cycleqd.evolve.loop import local_ray_env

    local_ray_env()
    import ray

    if not ray.is_initialized():
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
                 log_to_driver=False)


_PROBE = """
import json, sys
from cycleqd.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "ray": "ray" in sys.modules}))
"""


def cli_env() -> dict:
    """This process's environment for a CLI child: Ray on loopback, no usage statistics."""
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def cli(*argv: str) -> tuple[int, bool, str]:
    """Run the CLI in a fresh process: (exit code, whether Ray was imported, stderr)."""
    env = cli_env()
    out = subprocess.run([sys.executable, "-c", _PROBE, "-q", *argv], capture_output=True, text=True, env=env,
                         timeout=300)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["code"], res["ray"], out.stderr.strip()


class ScriptedEngine(Engine):
    """Answers each request with a function of its item (no model needed to test the checker)."""

    def __init__(self, task, answer):
        self.by_id = {it.id: it for it in task.items}
        self.answer = answer
        self.requests: list[GenRequest] = []

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        self.requests.extend(requests)
        return [self.answer(self.by_id[r.sample_id]) for r in requests]


#: ``python -c SLOW_GENOME_COPY MARKER <cycleqd args>``: the CLI, with an export's staging step held
#: open (the genome's copy writes MARKER, then waits) so that a signal lands inside it every time.
SLOW_GENOME_COPY = """
import pathlib, shutil, sys, time
real = shutil.copyfile
def copyfile(src, dst, *a, **k):
    out = real(src, dst, *a, **k)
    if str(dst).endswith("genome.safetensors"):
        pathlib.Path(sys.argv[1]).write_text("staging")
        time.sleep(120)
    return out
shutil.copyfile = copyfile
from cycleqd.cli import main
sys.exit(main(sys.argv[2:]))
"""


def evolve_until_then_kill(argv: Sequence[str], run: Path, children: int, *, env: dict | None = None,
                           cwd: str | Path | None = None, timeout: float = 300) -> None:
    """``cycleqd -q ARGV`` in a fresh process, SIGKILLed once ``run``'s log holds ``children`` lines.

    Asserts that the run was still going at the kill (a run that ends first tests no resume).
    """
    proc = subprocess.Popen([sys.executable, "-m", "cycleqd.cli", "-q", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, cwd=cwd)
    log, deadline = Path(run) / "children.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= children:
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"run ended before the kill: {proc.stderr.read().decode()[-800:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
