"""Where sandboxed jobs run: bubblewrap, a plain subprocess, or Docker.

Every backend runs a whole batch of jobs with one launch of
``cycleqd/sandbox/_runner.py``; the runner forks one limited child per job.

- ``bwrap``: read-only view of the host, empty network, own PID/IPC/UTS
  namespaces, a private size-limited ``/tmp`` and ``/dev/shm`` (tmpfs; ``/dev``
  itself read-only), a clean environment from bwrap itself on (the sandbox's
  PID 1 holds nothing of the worker's), killed with its parent.
- ``subprocess``: the runner on the host in its own session and a private temp
  folder; with root it still gives each job an unprivileged uid and an empty
  network namespace and hides the host's ``/tmp``, ``/dev/shm`` and ``/var/tmp``
  behind private size-limited ones; without root only rlimits and process groups apply.
- ``docker``: the runner in a container (``--network none``), for machines with a
  Docker engine (the AgentBench images); selecting it without one is a clear error.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

RUNNER = Path(__file__).with_name("_runner.py")
SANDBOX_RUNNER = "/tmp/.cycleqd_runner.py"  # where bwrap shows it
_ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CLEAN_ENV = {"PATH": _ENV_PATH, "LANG": "C.UTF-8"}  # all a sandbox process ever gets


@dataclass(frozen=True)
class RunResult:
    """Outcome of one sandboxed program.

    ``error`` is None when the program ran to its end (whatever its exit code);
    otherwise it says why not (timed out, killed by a signal, sandbox failure).
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    error: str | None

    @property
    def finished(self) -> bool:
        """It ran to its end within its time (whatever its exit code): no timeout, no sandbox error."""
        return not self.timed_out and self.error is None


class SandboxUnavailable(RuntimeError):
    """The selected backend cannot run on this machine (e.g. no Docker engine)."""


def _python() -> str:
    return os.path.realpath(sys.executable)


def _world_readable(path: str) -> bool:
    """True when every folder on the way to ``path`` lets other users through."""
    p = Path(path)
    for d in [p, *p.parents]:
        try:
            if d.is_dir() and not d.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _host_python() -> str:
    """An interpreter unprivileged job uids can run and import from (this one if possible)."""
    exe = _python()
    if os.geteuid() != 0 or _world_readable(os.path.dirname(exe)) and _world_readable(sys.base_prefix):
        return exe
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(cand) and _world_readable(os.path.dirname(os.path.realpath(cand))):
            return cand
    return exe


def _exits_zero(program: str, *args: str) -> bool:
    """True when ``program`` is installed and ``program args`` exits 0 within 20 s."""
    exe = shutil.which(program)
    if not exe:
        return False
    try:
        return subprocess.run([exe, *args], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.lru_cache(maxsize=None)
def bwrap_available() -> bool:
    """True when ``bwrap`` exists and can start a sandbox here."""
    return _exits_zero("bwrap", "--ro-bind", "/", "/", "--unshare-net", "--die-with-parent", "true")


@functools.lru_cache(maxsize=None)
def private_tmpfs_works() -> bool:
    """True when this process may mount a size-limited tmpfs in a mount namespace of its own
    (root, and a host that allows it): the condition for quotas outside bubblewrap."""
    exe = shutil.which("unshare")
    if os.geteuid() != 0 or exe is None:
        return False
    probe = tempfile.mkdtemp(prefix="cycleqd-probe-")
    try:
        r = subprocess.run([exe, "--mount", "--ipc", "--propagation", "private", "/bin/sh", "-c",
                            'mount -t tmpfs -o size=1m cycleqd-probe "$1"', "sh", probe],
                           capture_output=True, timeout=20, env=dict(_CLEAN_ENV))
        return r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def docker_available() -> bool:
    """True when a Docker engine answers."""
    return _exits_zero("docker", "info")


def _failed(n: int, why: str) -> list[RunResult]:
    return [RunResult(-1, "", "", False, 0.0, why) for _ in range(n)]


def _decode(results: Any, n: int) -> list[RunResult]:
    if not isinstance(results, list) or len(results) != n:
        return _failed(n, "sandbox runner returned a malformed answer")
    return [RunResult(**r) for r in results]


def _batch_limit(n: int, timeout: float, parallel: int) -> float:
    """Wall time the whole batch may take before the launch itself is killed."""
    return math.ceil(n / max(parallel, 1)) * (timeout + 1.0) + 30.0


def _launch(cmd: list[str], spec: dict, n: int, limit: float, env: dict | None = None) -> list[RunResult]:
    """Start the runner (its own session), feed it ``spec``, kill its group past ``limit``."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env=env, cwd="/")
    try:
        out, err = proc.communicate(json.dumps(spec).encode(), timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return _failed(n, f"sandbox batch exceeded {limit:.0f}s and was killed")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the runner left behind
        except OSError:
            pass
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return _failed(n, f"sandbox runner failed (exit {proc.returncode}): {tail[0]}")
    try:
        return _decode(json.loads(out), n)
    except (ValueError, TypeError):
        return _failed(n, "sandbox runner returned no results")


class Backend(Protocol):
    """Runs a batch of jobs (dicts with kind/code/files/init) with per-job limits."""

    name: str

    def run_batch(self, jobs: Sequence[dict], *, timeout: float, memory_mb: int,
                  max_output: int = 65536) -> list[RunResult]:
        ...


class SubprocessBackend:
    """The runner directly on the host, in a private temp folder and its own session.

    With root (where a private tmpfs can be mounted), the runner gets a mount namespace
    of its own in which ``/tmp``, ``/dev/shm`` and ``/var/tmp`` are fresh size-limited
    tmpfs mounts: the host's shared scratch folders are out of the jobs' reach, and
    what they write together has a quota.
    """

    name = "subprocess"

    def __init__(self, tmp_size_mb: int = 1024):
        self.tmp_size_mb = tmp_size_mb

    def run_batch(self, jobs: Sequence[dict], *, timeout: float, memory_mb: int,
                  max_output: int = 65536) -> list[RunResult]:
        if not jobs:
            return []
        parallel = os.cpu_count() or 1
        spec = {"jobs": list(jobs), "timeout": timeout, "memory_mb": memory_mb, "root": "/tmp/sb",
                "parallel": parallel, "max_output": max_output, "unshare_net": os.geteuid() == 0}
        limit = _batch_limit(len(jobs), timeout, parallel)
        if private_tmpfs_works():
            script = ('for d in /tmp /dev/shm /var/tmp; do [ -d "$d" ] || continue; '
                      f'mount -t tmpfs -o size={self.tmp_size_mb}m,mode=1777 cycleqd-sb "$d" || exit 97; done; '
                      'exec "$@"')
            # The runner's source travels on the command line: the project itself may live
            # under /tmp, which the new mount hides.
            cmd = [shutil.which("unshare") or "unshare", "--mount", "--propagation", "private",
                   "/bin/sh", "-c", script, "sh", _host_python(), "-I", "-c", RUNNER.read_text()]
            return _launch(cmd, spec, len(jobs), limit, dict(_CLEAN_ENV))
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # RAM-backed: job folders are cheap
        root = tempfile.mkdtemp(prefix="cycleqd-sb-", dir=shm)
        try:
            os.chmod(root, 0o711)  # job uids must traverse into their own folders
            spec["root"] = root
            return _launch([_host_python(), "-I", str(RUNNER)], spec, len(jobs), limit, dict(_CLEAN_ENV))
        finally:
            shutil.rmtree(root, ignore_errors=True)


class BwrapBackend:
    """The runner inside bubblewrap: read-only host, no network, private /tmp."""

    name = "bwrap"

    def __init__(self, tmp_size_mb: int = 1024, shm_size_mb: int = 64):
        if not bwrap_available():
            raise SandboxUnavailable("backend 'bwrap' selected but bubblewrap is missing or cannot start "
                                     "(Debian/Ubuntu: apt-get install bubblewrap)")
        self.tmp_size_mb = tmp_size_mb
        self.shm_size_mb = shm_size_mb

    def command(self) -> list[str]:
        """The bwrap argument list up to (not including) the program to run."""
        # Home folders are hidden (credentials live there); the interpreter is put back
        # read-only when it is installed under one of them (pyenv, conda).
        keep = []
        for p in sorted({os.path.dirname(_python()), os.path.realpath(sys.base_prefix)}):
            if p.startswith(("/root", "/home")) and not any(p.startswith(k + "/") for k in keep):
                keep.append(p)
        binds: list[str] = []
        for p in keep:
            parts = Path(p).parts  # ("/", "root", ".pyenv", ...): open each folder on the way
            for k in range(3, len(parts)):
                binds += ["--perms", "0755", "--dir", str(Path(*parts[:k]))]
            binds += ["--ro-bind", p, p]
        return [
            shutil.which("bwrap") or "bwrap",
            "--ro-bind", "/", "/",
            "--dev", "/dev",
            # every writable place has a quota; /dev itself (bwrap's tmpfs) is read-only
            "--perms", "01777", "--size", str(self.shm_size_mb << 20), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
            "--proc", "/proc",
            "--size", str(1 << 20), "--tmpfs", "/root", "--size", str(1 << 20), "--tmpfs", "/home", *binds,
            "--size", str(self.tmp_size_mb << 20), "--tmpfs", "/tmp",
            # the runner is mounted into the private /tmp: the project itself may live under
            # /tmp, /root or /home, which the sandbox hides
            "--ro-bind", str(RUNNER), SANDBOX_RUNNER,
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session",
            "--chdir", "/tmp",
            "--clearenv", "--setenv", "PATH", _ENV_PATH, "--setenv", "LANG", "C.UTF-8",
        ]

    def run_batch(self, jobs: Sequence[dict], *, timeout: float, memory_mb: int,
                  max_output: int = 65536) -> list[RunResult]:
        if not jobs:
            return []
        spec = _contained_spec(jobs, timeout, memory_mb, max_output)
        parallel = spec["parallel"]
        cmd = self.command() + [_python(), "-I", SANDBOX_RUNNER]
        return _launch(cmd, spec, len(jobs), _batch_limit(len(jobs), timeout, parallel), dict(_CLEAN_ENV))


def _contained_spec(jobs: Sequence[dict], timeout: float, memory_mb: int, max_output: int) -> dict:
    """The runner's input when the container (bwrap, Docker) already cuts the network and hides /tmp."""
    return {"jobs": list(jobs), "timeout": timeout, "memory_mb": memory_mb, "root": "/tmp/sb",
            "parallel": os.cpu_count() or 1, "max_output": max_output, "unshare_net": False}


class DockerBackend:
    """The runner inside a Docker container without network (needs a Docker engine)."""

    name = "docker"

    def __init__(self, image: str = "python:3.11-slim"):
        if not docker_available():
            raise SandboxUnavailable("backend 'docker' selected but no Docker engine is reachable "
                                     "(is dockerd running and is `docker info` allowed?); "
                                     "use backend 'bwrap' or 'subprocess'")
        self.image = image

    def run_batch(self, jobs: Sequence[dict], *, timeout: float, memory_mb: int,
                  max_output: int = 65536) -> list[RunResult]:
        if not jobs:
            return []
        spec = _contained_spec(jobs, timeout, memory_mb, max_output)
        parallel = spec["parallel"]
        cmd = ["docker", "run", "--rm", "-i", "--network", "none", "--pids-limit", "1024",
               "--memory", f"{memory_mb * parallel + 256}m",
               "-v", f"{RUNNER}:/cycleqd_runner.py:ro", self.image, "python", "-I", "/cycleqd_runner.py"]
        return _launch(cmd, spec, len(jobs), _batch_limit(len(jobs), timeout, parallel) + 60)


def get_backend(name: str = "auto") -> Backend:
    """Backend by name; ``auto`` = bwrap where it works, else subprocess.

    Raises:
        SandboxUnavailable: the named backend cannot run here.
        ValueError: unknown name.
    """
    if name == "auto":
        return BwrapBackend() if bwrap_available() else SubprocessBackend()
    if name == "bwrap":
        return BwrapBackend()
    if name == "subprocess":
        return SubprocessBackend()
    if name == "docker":
        return DockerBackend()
    raise ValueError(f"unknown sandbox backend {name!r} (known: auto, bwrap, subprocess, docker)")

