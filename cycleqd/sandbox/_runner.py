"""Batch runner executed *inside* the sandbox (standard library only).

Reads one JSON spec on stdin, runs every job in its own forked child and writes
one JSON list of results on stdout. Each child gets a fresh working folder, its
own process group, resource limits (address space, CPU seconds, file size,
processes) and, when the runner is root, its own unprivileged uid, so a job
cannot read root-only files, cannot see another job's output and can be killed
with everything it started. Python jobs run in the forked child itself (no
interpreter start-up per program), shell jobs exec bash.

Spec: {"jobs": [{"kind": "python"|"shell", "code": str, "files": {name: text},
"init": str|null}], "timeout": float, "memory_mb": int, "root": dir,
"parallel": int, "max_output": int, "unshare_net": bool}
(``unshare_net``: give each job an empty network namespace; bwrap already does.)
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import signal
import sys
import time

_UID_BASE = 200000  # unprivileged uids for jobs; need no passwd entry
_CLONE_NEWNET = 0x40000000
_PR_SET_CHILD_SUBREAPER = 36

# Modules model-written programs commonly import, loaded once before forking.
for _m in ("re", "math", "collections", "itertools", "heapq", "functools", "bisect", "string",
           "operator", "copy", "traceback", "typing", "cmath", "statistics", "fractions", "decimal"):
    try:
        __import__(_m)
    except Exception:  # pragma: no cover - optional module missing
        pass
import traceback  # noqa: E402

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _LIBC = False
    return _LIBC


def _write_files(folder: str, files: dict) -> None:
    for name, text in (files or {}).items():
        path = os.path.normpath(os.path.join(folder, name))
        if not path.startswith(folder + os.sep):
            raise ValueError(f"file name {name!r} leaves the working folder")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def _chown_tree(folder: str, uid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(folder):
        os.chown(dirpath, uid, uid)
        for n in filenames:
            os.chown(os.path.join(dirpath, n), uid, uid)


def _limit(timeout: float, memory_mb: int, privileged: bool) -> None:
    mem = memory_mb * 1024 * 1024
    cpu = int(timeout) + 1
    for res, val in (
        (resource.RLIMIT_AS, (mem, mem)),
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_FSIZE, (16 << 20, 16 << 20)),
        (resource.RLIMIT_NOFILE, (256, 256)),
        (resource.RLIMIT_CORE, (0, 0)),
        # Fork bombs stop here; the limit only binds a non-root uid (ours when privileged).
        (resource.RLIMIT_NPROC, (64, 64)),
    ):
        try:
            resource.setrlimit(res, val)
        except (ValueError, OSError):
            pass


def _child(job: dict, folder: str, out_fd: int, err_fd: int, spec: dict, uid: int | None) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
        os.setpgid(0, 0)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        os.chdir(folder)
        if spec.get("unshare_net"):
            libc = _libc()
            if libc and libc.unshare(_CLONE_NEWNET) != 0:
                raise OSError("could not isolate the network")
        _limit(spec["timeout"], spec["memory_mb"], uid is not None)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": folder, "TMPDIR": folder,
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        if job.get("init"):
            pid = os.fork()
            if pid == 0:
                os.dup2(null, 1)  # set-up output is not the program's output
                os.dup2(null, 2)
                os.execve("/bin/bash", ["bash", "--noprofile", "--norc", "-c", job["init"]], env)
            os.waitpid(pid, 0)
        if job["kind"] == "shell":
            os.execve("/bin/bash", ["bash", "--noprofile", "--norc", "-c", job["code"]], env)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = ["main.py"]
        sys.stdin = open(0)
        sys.path.insert(0, folder)
        glb = {"__name__": "__main__", "__file__": os.path.join(folder, "main.py"), "__builtins__": __builtins__}
        try:
            exec(compile(job["code"], "main.py", "exec"), glb)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(code)


def _kill_uid(uid: int) -> None:
    """Kill every process of ``uid`` (a job's leftovers, even ones that left its group)."""
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            except BaseException:
                pass
            os._exit(0)
        os.waitpid(pid, 0)


def _sweep(lo: int, hi: int) -> None:
    """Kill leftovers of any job uid in [lo, hi) that escaped their process group."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{name}").st_uid
        except OSError:
            continue
        if lo <= uid < hi:
            _kill_uid(uid)


def _read(fd: int, limit: int) -> str:
    """Read and close a job's output file."""
    try:
        data = os.pread(fd, limit + 1, 0)
    except OSError:
        data = b""
    finally:
        os.close(fd)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > limit else "")


def main() -> None:
    spec = json.loads(sys.stdin.read())
    jobs = spec["jobs"]
    root = spec["root"]
    timeout = float(spec["timeout"])
    parallel = max(1, int(spec.get("parallel") or os.cpu_count() or 1))
    limit = int(spec.get("max_output", 65536))
    privileged = os.geteuid() == 0
    libc = _libc()
    if libc:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of jobs come back to us for reaping
    os.makedirs(root, exist_ok=True)
    results: list = [None] * len(jobs)
    pending = list(range(len(jobs)))[::-1]
    running: dict = {}  # pid -> (index, start, uid)
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])  # wait for children without polling
    gc.collect()
    gc.freeze()  # keeps the children's garbage collector off the parent's pages (fewer copy-on-write faults)
    while pending or running:
        while pending and len(running) < parallel:
            i = pending.pop()
            job = jobs[i]
            folder = os.path.join(root, f"job{i}")
            uid = _UID_BASE + i if privileged else None
            try:
                os.makedirs(folder)
                _write_files(folder, job.get("files") or {})
                if uid is not None:
                    _chown_tree(folder, uid)
                    os.chmod(folder, 0o700)  # other jobs must not read it
                # Anonymous in-memory files: no file system round trip, invisible to other jobs.
                out_fd = os.memfd_create(f"out{i}")
                err_fd = os.memfd_create(f"err{i}")
            except Exception as e:  # a bad job is that job's failure
                results[i] = {"returncode": -1, "stdout": "", "stderr": "", "timed_out": False,
                              "seconds": 0.0, "error": f"setup failed: {e}"}
                continue
            start = time.monotonic()
            pid = os.fork()
            if pid == 0:
                _child(job, folder, out_fd, err_fd, spec, uid)
            running[pid] = [i, start, uid, False, out_fd, err_fd]
        progressed = False
        while running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            progressed = True
            if pid not in running:
                continue  # a reaped orphan
            i, start, uid, timed_out, out_fd, err_fd = running.pop(pid)
            try:
                os.killpg(pid, signal.SIGKILL)  # background leftovers in the job's group
            except OSError:
                pass
            if uid is not None and timed_out:
                _kill_uid(uid)  # a runaway (fork bomb) may have left its group
            if os.WIFEXITED(status):
                rc = os.WEXITSTATUS(status)
                error = None
            else:
                sig = os.WTERMSIG(status)
                rc = -sig
                error = None if timed_out else f"killed by signal {sig}"
            if timed_out:
                error = f"timed out after {timeout:g}s"
            results[i] = {
                "returncode": rc,
                "stdout": _read(out_fd, limit),
                "stderr": _read(err_fd, limit),
                "timed_out": timed_out,
                "seconds": time.monotonic() - start,
                "error": error,
            }
        now = time.monotonic()
        for pid, entry in running.items():
            if not entry[3] and now - entry[1] > timeout:
                entry[3] = True
                for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                    try:
                        target()
                    except OSError:
                        pass
        if running and not progressed:
            nearest = min(entry[1] for entry in running.values()) + timeout
            signal.sigtimedwait([signal.SIGCHLD], max(0.0005, min(0.05, nearest - time.monotonic())))
    if privileged:
        _sweep(_UID_BASE, _UID_BASE + len(jobs))
    sys.stdout.write(json.dumps(results))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
