"""Where sandboxed jobs run: bubblewrap, Docker, or (unsafe, opt-in only) a plain subprocess.

Every backend runs a whole batch of jobs with one launch of
``cycleqd/sandbox/_runner.py``; the runner forks one limited child per job (its own
uid, memory cgroup, mount namespace with private size-limited ``/tmp``, ``/dev/shm``
and ``/var/tmp``, and only its own output descriptors; see the runner's docstring).

- ``bwrap``: an allow-list view of the host: ``/usr`` (and the ``/bin``, ``/lib*``,
  ``/sbin`` links to it), ``/etc`` and the interpreter's own prefix, read-only; nothing
  else of the host exists inside (no project folder, benchmark data, ``/opt``, ``/srv``,
  ``/mnt``, ``/var``, homes, ``/root``). Empty network, own PID/IPC/UTS namespaces,
  ``/dev`` read-only, a clean environment, killed with its parent. Where this process
  may create cgroups (root, cgroup v1 memory hierarchy or a delegated v2 one), the batch
  gets a memory cgroup and each job one of ``memory_mb`` under it, counting shared
  memory and tmpfs pages; elsewhere a warning says that only the address-space rlimit
  holds (shared memory is then not counted).
- ``docker``: the runner in a container (``--network none``, ``--memory``), for machines
  with a Docker engine (the AgentBench images); selecting it without one is a clear error.
- ``subprocess``: **refused** by :func:`get_backend` with :class:`UnsafeBackend` (a
  ValueError): the runner on the host sees the host's files (project folder, benchmark
  data with reference solutions, ``/run``, ``/opt``), so it cannot keep the rules above.
  It stays available only as an explicit opt-in, ``get_backend("subprocess",
  allow_unsafe=True)``, for trusted code on a machine without bubblewrap. ``auto`` is
  bwrap, and raises SandboxUnavailable where bwrap cannot start: it never falls back to
  running model code uncontained.
"""
from __future__ import annotations

import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from cycleqd.sandbox import cgroups

RUNNER = Path(__file__).with_name("_runner.py")
CGROUPS = Path(__file__).with_name("cgroups.py")  # the runner loads it from beside itself
SANDBOX_RUNNER = "/run/cycleqd/runner.py"  # where bwrap shows it
SANDBOX_JOBS = "/run/cycleqd/jobs"         # the batch's job files, readable by the runner (root) only
SANDBOX_CGROUP = "/run/cycleqd/cg"         # the batch's cgroup folders, one per controller
_ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CLEAN_ENV = {"PATH": _ENV_PATH, "LANG": "C.UTF-8"}  # all a sandbox process ever gets
CGROUP_PREFIX = "cycleqd-sb"
MAX_RESULT = 1 << 20  # the runner's cap on a call job's encoded values


@dataclass(frozen=True)
class RunResult:
    """Outcome of one sandboxed program.

    ``error`` is None when the program ran to its end (whatever its exit code);
    otherwise it says why not (timed out, out of memory, killed by a signal, sandbox
    failure). ``result`` is what a ``calls`` job wrote to its result descriptor
    (decode it with :func:`cycleqd.sandbox.verdict.decode_results`), else None.
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    error: str | None
    result: str | None = None

    @property
    def finished(self) -> bool:
        """It ran to its end within its time (whatever its exit code): no timeout, no sandbox error."""
        return not self.timed_out and self.error is None


class SandboxUnavailable(RuntimeError):
    """The selected backend cannot run on this machine (e.g. no Docker engine, no bubblewrap)."""


class UnsafeBackend(ValueError):
    """A backend that cannot contain model code was selected without the explicit unsafe opt-in."""


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


@functools.lru_cache(maxsize=None)
def _sweep_once() -> None:
    """Batch cgroups a killed worker left behind go at the next start."""
    cgroups.sweep_stale(CGROUP_PREFIX)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _failed(n: int, why: str) -> list[RunResult]:
    return [RunResult(-1, "", "", False, 0.0, why) for _ in range(n)]


_FIELDS = ("returncode", "stdout", "stderr", "timed_out", "seconds", "error", "result")


def _decode(answer: Any, n: int) -> list[RunResult]:
    results = answer.get("results") if isinstance(answer, dict) else answer
    if not isinstance(results, list) or len(results) != n:
        return _failed(n, "sandbox runner returned a malformed answer")
    for note in (answer.get("notes") or []) if isinstance(answer, dict) else []:
        _warn_once(f"sandbox: {note}")
    return [RunResult(**{k: r.get(k, "" if k in ("stdout", "stderr") else None) for k in _FIELDS})
            for r in results]


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


class _Batch:
    """Host-side state of one batch: its job files (root-only) and its cgroup."""

    def __init__(self, jobs: Sequence[dict], memory_mb: int, parallel: int, max_output: int, *,
                 host_cgroup: bool = True):
        """Write the job files; with ``host_cgroup`` (and root) make the batch's cgroup here."""
        self.dir = Path(tempfile.mkdtemp(prefix="cycleqd-jobs-"))
        os.chmod(self.dir, 0o700)  # job uids cannot read other jobs' code
        for i, job in enumerate(jobs):
            (self.dir / f"{i}.json").write_text(json.dumps(job))
        self.kinds = [str(j.get("kind", "python")) for j in jobs]
        self.group = None
        if not host_cgroup:  # a container's own limit holds the batch
            return
        if os.geteuid() == 0:
            _sweep_once()
            outputs = math.ceil(len(jobs) * (2 * max_output + MAX_RESULT) / (1 << 20))
            self.group = cgroups.make_group(CGROUP_PREFIX, memory_mb=parallel * memory_mb + 512 + outputs,
                                            pids=parallel * 256 + 64)
        if os.geteuid() != 0:
            _warn_once("sandbox: not root, so jobs of a batch share one uid and one /tmp and get no memory "
                       "cgroup; run as root (or in a root container) for per-job isolation")
        elif self.group is None:
            _warn_once("sandbox: no memory cgroup can be made here (needs root and a writable cgroup v1 memory "
                       "hierarchy or a delegated v2 one); jobs are held by RLIMIT_AS only, which does not count "
                       "shared memory (memfd, /dev/shm)")

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.group is not None:
            self.group.remove()


def _spec(jobs: Sequence[dict], batch: _Batch, *, timeout: float, memory_mb: int, max_output: int,
          parallel: int, scratch_mb: int, jobs_dir: str, cgroup: dict | None, unshare_net: bool,
          root: str = "/tmp/sb") -> dict:
    return {"n": len(jobs), "jobs_dir": jobs_dir, "kinds": batch.kinds, "timeout": timeout,
            "memory_mb": memory_mb, "scratch_mb": max(16, min(scratch_mb, memory_mb // 2)),
            "root": root, "parallel": parallel, "max_output": max_output,
            "unshare_net": unshare_net, "cgroup": cgroup,
            # job uids of their own: two batches on one machine never share one (signals, files)
            "uid_base": 200000 + secrets.randbelow(30000) * 65536}


class Backend(Protocol):
    """Runs a batch of jobs (dicts with kind/code/files/init) with per-job limits."""

    name: str

    def run_batch(self, jobs: Sequence[dict], *, timeout: float, memory_mb: int,
                  max_output: int = 65536) -> list[RunResult]:
        ...


@dataclass(frozen=True)
class _Placement:
    """Where one batch's runner starts: its command, and the paths and rights it sees there."""

    command: list[str]
    jobs_dir: str
    cgroup: dict | None = None
    unshare_net: bool = False
    root: str = "/tmp/sb"
    env: dict | None = None
    extra_seconds: float = 0.0


class _RunnerBackend:
    """One batch's life, the same for every backend: write the job files (and make the cgroup),
    place the runner (the backend's part), launch it with the spec, clean up."""

    name = ""
    host_cgroup = True
    tmp_size_mb = 1024

    def run_batch(self, jobs: Sequence[dict], *, timeout: float, memory_mb: int,
                  max_output: int = 65536) -> list[RunResult]:
        if not jobs:
            return []
        parallel = os.cpu_count() or 1
        batch = _Batch(jobs, memory_mb, parallel, max_output, host_cgroup=self.host_cgroup)
        try:
            with self._place(batch, memory_mb=memory_mb, parallel=parallel) as place:
                spec = _spec(jobs, batch, timeout=timeout, memory_mb=memory_mb, max_output=max_output,
                             parallel=parallel, scratch_mb=self.tmp_size_mb, jobs_dir=place.jobs_dir,
                             cgroup=place.cgroup, unshare_net=place.unshare_net, root=place.root)
                limit = _batch_limit(len(jobs), timeout, parallel) + place.extra_seconds
                return _launch(place.command, spec, len(jobs), limit, place.env)
        finally:
            batch.cleanup()

    def _place(self, batch: _Batch, *, memory_mb: int, parallel: int) -> AbstractContextManager[_Placement]:
        raise NotImplementedError


class SubprocessBackend(_RunnerBackend):
    """UNSAFE: the runner directly on the host (see the module docstring); explicit opt-in only.

    With root, jobs still get their own uid, memory cgroup, network namespace and
    private ``/tmp``, but they can read every world-readable host file.

    Raises:
        UnsafeBackend: constructed without ``unsafe=True``.
    """

    name = "subprocess"

    def __init__(self, tmp_size_mb: int = 1024, *, unsafe: bool = False):
        if not unsafe:
            raise UnsafeBackend(_SUBPROCESS_REFUSED)
        self.tmp_size_mb = tmp_size_mb

    @contextmanager
    def _place(self, batch: _Batch, *, memory_mb: int, parallel: int) -> Iterator[_Placement]:
        root = tempfile.mkdtemp(prefix="cycleqd-sb-")
        try:
            os.chmod(root, 0o711)
            cg = {k: str(v) for k, v in batch.group.dirs.items()} if batch.group else None
            yield _Placement([_host_python(), "-I", str(RUNNER)], str(batch.dir), cg,
                             unshare_net=os.geteuid() == 0, root=root, env=dict(_CLEAN_ENV))
        finally:
            shutil.rmtree(root, ignore_errors=True)


_SUBPROCESS_REFUSED = (
    "sandbox backend 'subprocess' cannot contain model-written code (a job on the host can read the "
    "project, the benchmark data and every world-readable file); use backend 'bwrap' (Debian/Ubuntu: "
    "apt-get install bubblewrap) or 'docker'")


def _allowed_host_paths() -> list[str]:
    """bwrap arguments that show the host's system folders and the interpreter, read-only."""
    args: list[str] = []
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    # The interpreter and its standard library, where they are installed outside /usr (pyenv
    # under /root, conda under /opt): only that prefix comes back, nothing beside it.
    keep: list[str] = []
    for p in sorted({os.path.dirname(_python()), os.path.realpath(sys.base_prefix)}):
        if not p.startswith(("/usr/", "/bin", "/lib")) and not any(p == k or p.startswith(k + "/") for k in keep):
            keep.append(p)
    for p in keep:
        parts = Path(p).parts  # ("/", "root", ".pyenv", ...): open each folder on the way
        for k in range(2, len(parts)):
            args += ["--perms", "0755", "--dir", str(Path(*parts[:k]))]
        args += ["--ro-bind", p, p]
    return args


class BwrapBackend(_RunnerBackend):
    """The runner inside bubblewrap: allow-listed read-only host, no network, private scratch per job."""

    name = "bwrap"

    def __init__(self, tmp_size_mb: int = 1024, shm_size_mb: int = 64):
        if not bwrap_available():
            raise SandboxUnavailable("backend 'bwrap' selected but bubblewrap is missing or cannot start "
                                     "(Debian/Ubuntu: apt-get install bubblewrap)")
        self.tmp_size_mb = tmp_size_mb
        self.shm_size_mb = shm_size_mb

    def command(self, binds: Sequence[str] = ()) -> list[str]:
        """The bwrap argument list up to (not including) the program to run; ``binds`` are
        extra bwrap arguments placed after the host view (e.g. the batch's job files)."""
        return [
            shutil.which("bwrap") or "bwrap",
            *_allowed_host_paths(),
            "--dev", "/dev",
            # every writable place has a quota; /dev itself (bwrap's tmpfs) is read-only
            "--perms", "01777", "--size", str(self.shm_size_mb << 20), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
            "--proc", "/proc",
            "--size", str(self.tmp_size_mb << 20), "--tmpfs", "/tmp",
            "--perms", "01777", "--dir", "/var/tmp",
            "--ro-bind", str(RUNNER), SANDBOX_RUNNER,
            "--ro-bind", str(CGROUPS), str(Path(SANDBOX_RUNNER).with_name(CGROUPS.name)),
            *binds,
            "--remount-ro", "/",
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session",
            "--chdir", "/tmp",
            "--clearenv", "--setenv", "PATH", _ENV_PATH, "--setenv", "LANG", "C.UTF-8",
        ]

    @contextmanager
    def _place(self, batch: _Batch, *, memory_mb: int, parallel: int) -> Iterator[_Placement]:
        binds = ["--ro-bind", str(batch.dir), SANDBOX_JOBS]
        cg = None
        if batch.group is not None:
            cg = {}
            for controller, d in batch.group.dirs.items():
                binds += ["--bind", str(d), f"{SANDBOX_CGROUP}/{controller}"]
                cg[controller] = f"{SANDBOX_CGROUP}/{controller}"
        yield _Placement(self.command(binds) + [_python(), "-I", SANDBOX_RUNNER], SANDBOX_JOBS, cg,
                         env=dict(_CLEAN_ENV))


class DockerBackend(_RunnerBackend):
    """The runner inside a Docker container without network (needs a Docker engine)."""

    name = "docker"
    host_cgroup = False

    def __init__(self, image: str = "python:3.11-slim"):
        if not docker_available():
            raise SandboxUnavailable("backend 'docker' selected but no Docker engine is reachable "
                                     "(is dockerd running and is `docker info` allowed?); "
                                     "use backend 'bwrap'")
        self.image = image

    @contextmanager
    def _place(self, batch: _Batch, *, memory_mb: int, parallel: int) -> Iterator[_Placement]:
        # the container's --memory is the batch's limit (no host cgroup); starting it takes a while
        yield _Placement(["docker", "run", "--rm", "-i", "--network", "none", "--pids-limit", "1024",
                          "--memory", f"{memory_mb * parallel + 256}m",
                          "-v", f"{RUNNER}:/cycleqd/runner.py:ro", "-v", f"{CGROUPS}:/cycleqd/{CGROUPS.name}:ro",
                          "-v", f"{batch.dir}:/cycleqd_jobs:ro", self.image, "python", "-I", "/cycleqd/runner.py"],
                         "/cycleqd_jobs", extra_seconds=60.0)


def get_backend(name: str = "auto", *, allow_unsafe: bool = False) -> Backend:
    """Backend by name; ``auto`` = bwrap (never an uncontained fallback).

    ``subprocess`` runs model code on the host and is refused unless ``allow_unsafe``.

    Raises:
        SandboxUnavailable: the named backend (or, for ``auto``, bwrap) cannot run here.
        UnsafeBackend: ``subprocess`` without ``allow_unsafe`` (a ValueError: bad configuration).
        ValueError: unknown name.
    """
    if name == "auto":
        if not bwrap_available():
            raise SandboxUnavailable("no contained sandbox here: bubblewrap is missing or cannot start "
                                     "(Debian/Ubuntu: apt-get install bubblewrap), and 'auto' does not fall "
                                     "back to running model code on the host; or select backend 'docker'")
        return BwrapBackend()
    if name == "bwrap":
        return BwrapBackend()
    if name == "subprocess":
        if not allow_unsafe:
            raise UnsafeBackend(_SUBPROCESS_REFUSED)
        return SubprocessBackend(unsafe=True)
    if name == "docker":
        return DockerBackend()
    raise ValueError(f"unknown sandbox backend {name!r} (known: auto, bwrap, subprocess, docker)")
