"""Batch runner executed *inside* the sandbox (standard library only).

Reads one JSON spec on stdin, runs every job in its own forked child and writes one
JSON object ``{"results": [...], "notes": [...]}`` on stdout.

What each job gets, when the runner is root (bwrap and Docker start it so):

- its own unprivileged uid (other jobs' processes, files and ``/proc`` entries are
  out of its reach), its own process group, rlimits (address space, CPU seconds,
  file size, open files, processes);
- its own memory cgroup (``spec["cgroup"]``: a folder the runner may create cgroups
  in) whose limit counts shared memory, memfd and tmpfs pages too;
- its own mount namespace in which ``/tmp``, ``/dev/shm`` and ``/var/tmp`` are fresh
  tmpfs mounts of ``scratch_mb`` each (its working folder is ``/tmp/job``): no job
  sees another's files or can fill the space another needs; and a ``/proc`` that shows
  its own processes only (``hidepid=2``: no other job's command line);
- only its own descriptors: 0 is ``/dev/null``, 1 and 2 its output memfds, 3 (call
  jobs) its result memfd; every other descriptor is closed before its code runs.

The runner itself never holds another job's code (each child reads its own job file
from ``spec["jobs_dir"]`` after the fork) and reads no job's output before the last
job has been forked, so nothing of one job is in the memory a later job inherits.

Job kinds: ``python`` (the code runs in the forked child: no interpreter start-up),
``shell`` (bash), and ``calls``: run ``code`` then ``setup``, evaluate each expression
of ``calls`` and write the values, encoded by :func:`encode_value`, to descriptor 3.
The trusted side decodes them with :func:`decode_value` (see cycleqd.sandbox.verdict).

Spec: {"n": int, "jobs_dir": dir | None, "jobs": [job] | None, "timeout": float,
"memory_mb": int, "scratch_mb": int, "root": dir, "parallel": int, "max_output": int,
"unshare_net": bool, "uid_base": int, "cgroup": {"memory": dir, "pids": dir | None} | None}.
A job: {"kind": "python"|"shell"|"calls", "code": str, "files": {name: text},
"init": str|null, "setup": str, "calls": [str], "inputs": encoded list,
"call_timeout": float | [float] | null}.
"""
from __future__ import annotations

import base64
import ctypes
import gc
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path


def _load_cgroups():
    """cycleqd/sandbox/cgroups.py (standard library only): the package's where it is imported
    on the host, else the copy the backends put beside this file in the sandbox."""
    if __package__:
        from cycleqd.sandbox import cgroups as module
        return module
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cgroups.py")
    spec = importlib.util.spec_from_file_location("cycleqd_cgroups", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


cgroups = _load_cgroups()

_UID_BASE = 200000  # unprivileged uids for jobs (need no passwd entry); spec["uid_base"] overrides
_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_DUMPABLE = 4
RESULT_FD = 3
MAX_RESULT = 1 << 20     # bytes of encoded call values a job may give
MAX_DEPTH = 64           # nesting of an encoded value
MAX_ITEMS = 1 << 20      # containers + scalars in one job's values
MAX_INT_HEX = 16384      # hex digits of one int (65536 bits)

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


# -- the value codec: exact builtin types only, bounded ---------------------------------------
class Unencodable(Exception):
    """A value outside the codec: another type (subclasses included), too deep or too large."""


_type, _len, _list, _tuple, _set, _frozenset, _dict = type, len, list, tuple, set, frozenset, dict
_int, _float, _complex, _str, _bytes, _bool = int, float, complex, str, bytes, bool
# The standard library's own containers (exact types, held before any job code runs): their
# contents travel, and the trusted side rebuilds them with its own classes.
import collections as _collections  # noqa: E402

_SEQUENCES = {_list: "l", _tuple: "t", _set: "s", _frozenset: "z", _collections.deque: "q"}
_MAPPINGS = {_dict: "d", _collections.Counter: "C", _collections.OrderedDict: "O", _collections.defaultdict: "D"}
_BUILD = {"l": _list, "t": _tuple, "s": _set, "z": _frozenset, "q": _collections.deque,
          "d": _dict, "C": lambda pairs: _collections.Counter(_dict(pairs)), "O": _collections.OrderedDict,
          "D": lambda pairs: _collections.defaultdict(None, pairs)}


def _spend(budget, depth: int, error: type) -> list:
    """One more value of at most MAX_ITEMS at nesting ``depth`` (a fresh budget when None).

    Raises:
        error: the budget is spent or ``depth`` is past MAX_DEPTH.
    """
    budget = budget if budget is not None else [MAX_ITEMS]
    budget[0] -= 1
    if budget[0] < 0:
        raise error("value too large")
    if depth > MAX_DEPTH:
        raise error("value nested too deeply")
    return budget


def encode_value(value, _budget=None, _depth=0):
    """``value`` as JSON-able tagged data: None, bool, int, float, complex, str, bytes and
    list / tuple / dict / set / frozenset of them (and the standard library's deque, Counter,
    OrderedDict, defaultdict); exact types only (``type(v) is int``: no subclasses).

    Raises:
        Unencodable: another type (a subclass too), nesting past MAX_DEPTH, more than MAX_ITEMS.
    """
    budget = _spend(_budget, _depth, Unencodable)
    t = _type(value)
    if value is None or t is _bool or t is _str:
        return value
    if t is _int:
        h = _int.__format__(value, "x")
        if _len(h) > MAX_INT_HEX:
            raise Unencodable("int too large")
        return ["i", h]
    if t is _float:
        return ["f", _float.hex(value)]
    if t is _complex:
        return ["c", _float.hex(value.real), _float.hex(value.imag)]
    if t is _bytes:
        return ["y", base64.b64encode(value).decode("ascii")]
    tag = _SEQUENCES.get(t)
    if tag is not None:
        out = [tag]
        for v in (_list(value) if t is not _collections.deque else _list(_collections.deque.__iter__(value))):
            out.append(encode_value(v, budget, _depth + 1))
        return out
    tag = _MAPPINGS.get(t)
    if tag is not None:
        out = [tag]
        for k, v in _list(_dict.items(value)):
            out.append(encode_value(k, budget, _depth + 1))
            out.append(encode_value(v, budget, _depth + 1))
        return out
    raise Unencodable(f"a {t.__name__} is not a plain value" if isinstance(t, type) else "not a plain value")


def decode_value(data, _budget=None, _depth=0):
    """The value :func:`encode_value` encoded; exact builtin types, bounded like it.

    Raises:
        ValueError: malformed, too deep or too large (never evaluates anything).
    """
    budget = _spend(_budget, _depth, ValueError)
    t = _type(data)
    if data is None or t is _bool or t is _str:
        return data
    if t is not _list or not data or _type(data[0]) is not _str:
        raise ValueError("malformed value")
    tag, rest = data[0], data[1:]
    try:
        if tag == "i" and _len(rest) == 1 and _type(rest[0]) is _str and _len(rest[0]) <= MAX_INT_HEX + 1:
            return _int(rest[0], 16)
        if tag == "f" and _len(rest) == 1 and _type(rest[0]) is _str and _len(rest[0]) < 40:
            return _float.fromhex(rest[0])
        if tag == "c" and _len(rest) == 2 and all(_type(x) is _str and _len(x) < 40 for x in rest):
            return _complex(_float.fromhex(rest[0]), _float.fromhex(rest[1]))
        if tag == "y" and _len(rest) == 1 and _type(rest[0]) is _str:
            return base64.b64decode(rest[0].encode("ascii"), validate=True)
        if tag in ("l", "t", "s", "z", "q"):
            return _BUILD[tag]([decode_value(v, budget, _depth + 1) for v in rest])
        if tag in ("d", "C", "O", "D") and _len(rest) % 2 == 0:
            return _BUILD[tag]([(decode_value(rest[k], budget, _depth + 1), decode_value(rest[k + 1], budget, _depth + 1))
                                for k in range(0, _len(rest), 2)])
    except (TypeError, ValueError, OverflowError, UnicodeError) as e:  # unhashable key, bad digits
        raise ValueError(f"malformed value ({type(e).__name__})") from None
    raise ValueError("malformed value")


def decode_results(text: str) -> list:
    """A call job's result text as ``(status, value or reason, seconds)`` per call: status ``ok``
    (then a value), ``raised`` (the exception's name) or ``bad`` (no plain value: why).

    Raises:
        ValueError: not a result list this runner writes (size, depth, shape).
    """
    if _len(text) > MAX_RESULT:
        raise ValueError("result too large")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError("result is not JSON") from None
    if _type(data) is not _dict or _type(data.get("r")) is not _list:
        raise ValueError("malformed result")
    budget = [MAX_ITEMS]
    out = []
    for item in data["r"]:
        if _type(item) is not _list or _len(item) != 3 or item[0] not in ("ok", "raised", "bad") \
                or _type(item[2]) not in (_int, _float):
            raise ValueError("malformed result")
        seconds = _float(item[2])
        if item[0] == "ok":
            out.append(("ok", decode_value(item[1], budget), seconds))
        elif _type(item[1]) is _str:
            out.append((item[0], item[1][:200], seconds))
        else:
            raise ValueError("malformed result")
    return out


# -- one job --------------------------------------------------------------------------------
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


def _limit(timeout: float, memory_mb: int) -> None:
    mem = memory_mb * 1024 * 1024
    cpu = int(timeout) + 1
    for res, val in (
        (resource.RLIMIT_AS, (mem, mem)),  # second line behind the memory cgroup
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


def _close_from(low: int) -> None:
    """Close every descriptor >= ``low`` (other jobs' outputs, the runner's pipes)."""
    libc = _libc()
    if libc and libc.close_range(ctypes.c_uint(low), ctypes.c_uint(0xFFFFFFFF), 0) == 0:
        return
    os.closerange(low, max(os.sysconf("SC_OPEN_MAX"), 65536))


def _mount(src, target, fstype, flags, data) -> None:
    libc = _libc()
    if not libc or libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(),
                              ctypes.c_ulong(flags), data and data.encode()) != 0:
        raise OSError(ctypes.get_errno() if libc else 0, f"mount {target} failed")


def _private_scratch(scratch_mb: int, unshare_net: bool) -> str:
    """A mount namespace of the job's own with fresh size-limited /tmp, /dev/shm and /var/tmp."""
    libc = _libc()
    if not libc or libc.unshare(_CLONE_NEWNS | (_CLONE_NEWNET if unshare_net else 0)) != 0:
        raise OSError("no mount namespace")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)
    for d in ("/tmp", "/dev/shm", "/var/tmp"):
        if os.path.isdir(d):
            _mount("cycleqd-job", d, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={scratch_mb}m,mode=1777")
    # A /proc of its own that lists only its own processes: other jobs' command lines (a shell
    # job's code is in its argv) and the runner are out of sight.
    try:
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "hidepid=2")
    except OSError:
        pass
    return "/tmp/job"


def _load_job(spec: dict, i: int) -> dict:
    if spec.get("jobs") is not None:
        return spec["jobs"][i]
    with open(os.path.join(spec["jobs_dir"], f"{i}.json")) as f:
        return json.load(f)


def _child(i: int, spec: dict, fds: tuple, uid: int | None, group, fallback: str) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        job = _load_job(spec, i)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
        os.setpgid(0, 0)
        out_fd, err_fd, res_fd = fds
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        if res_fd is not None:
            os.dup2(res_fd, RESULT_FD)
        _close_from(RESULT_FD + 1 if res_fd is not None else 3)
        group.join()
        folder = fallback
        if uid is not None:
            try:
                folder = _private_scratch(int(spec.get("scratch_mb") or 256), bool(spec.get("unshare_net")))
            except OSError:
                folder = fallback  # no mount rights (e.g. Docker): a private folder under the runner's root
                if spec.get("unshare_net"):
                    libc = _libc()
                    if not libc or libc.unshare(_CLONE_NEWNET) != 0:
                        raise OSError("could not isolate the network")
        os.makedirs(folder, exist_ok=True)
        _write_files(folder, job.get("files") or {})
        if uid is not None:
            _chown_tree(folder, uid)
            os.chmod(folder, 0o700)  # other jobs must not read it
        os.chdir(folder)
        _limit(spec["timeout"], spec["memory_mb"])
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            libc = _libc()
            if libc:
                libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)  # its own /proc/self as usual
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": folder, "TMPDIR": "/tmp",
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        if job.get("init"):
            pid = os.fork()
            if pid == 0:
                os.dup2(0, 1)  # set-up output is not the program's output
                os.dup2(0, 2)
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
        if job["kind"] == "calls":
            code = _run_calls(job, glb)
        else:
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


class _Late(BaseException):
    pass


def _alarm(signum, frame):
    raise _Late()


def _run_calls(job: dict, glb: dict) -> int:
    """Run the program and its set-up, evaluate each call, write the values to RESULT_FD.

    Nothing is written when the program or set-up does not run to its end (exit, exception):
    the trusted side then has no values, and every check fails.
    """
    try:
        exec(compile(job["code"], "main.py", "exec"), glb)
        if job.get("setup"):
            exec(compile(job["setup"], "setup.py", "exec"), glb)
        glb["_cq_inputs"] = decode_value(job.get("inputs") or ["l"])
    except BaseException:
        traceback.print_exc()
        return 1
    limits = job.get("call_timeout")
    calls = job.get("calls") or []
    if not isinstance(limits, list):
        limits = [limits] * len(calls)
    signal.signal(signal.SIGALRM, _alarm)
    out = []
    for expr, limit in zip(calls, limits):
        t0 = time.perf_counter()
        try:
            if limit:
                signal.setitimer(signal.ITIMER_REAL, float(limit))
            try:
                value = eval(compile(expr, "call", "eval"), glb)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            try:
                item = ["ok", encode_value(value)]
            except Unencodable as e:
                item = ["bad", str(e)]
            except RecursionError:
                item = ["bad", "value nested too deeply"]
        except _Late:
            item = ["raised", "TimeoutError"]
        except BaseException as e:
            name = _type(e).__name__
            item = ["raised", name if _type(name) is _str else "Exception"]
        item.append(time.perf_counter() - t0)
        out.append(item)
    data = json.dumps({"r": out}).encode()
    if _len(data) > MAX_RESULT:
        data = json.dumps({"r": [["bad", "result too large", 0.0]] * _len(out)}).encode()
    os.ftruncate(RESULT_FD, 0)
    os.pwrite(RESULT_FD, data, 0)
    return 0


# -- the batch ------------------------------------------------------------------------------
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


def _read(fd: int | None, limit: int, note: bool = True) -> str | None:
    """Read and close a job's output file."""
    if fd is None:
        return None
    try:
        data = os.pread(fd, limit + 1, 0)
    except OSError:
        data = b""
    finally:
        os.close(fd)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if note and len(data) > limit else "")


def _job_cgroup(spec: dict, i: int):
    """The job's cgroup (memory limit, process limit) under the batch's, made by the runner;
    an empty group where the batch has none.

    Raises:
        OSError: the batch has a memory cgroup but the job's limit did not take.
    """
    where = {c: Path(d) for c, d in (spec.get("cgroup") or {}).items() if d}
    group = cgroups.create(f"job{i}", where, memory_mb=int(spec["memory_mb"]), pids=256)
    if "memory" in where and "memory" not in group.dirs:
        group.remove()
        raise OSError("the job's memory limit was refused")
    return group


def main() -> None:
    spec = json.loads(sys.stdin.read())
    n = int(spec["n"]) if "n" in spec else len(spec["jobs"])
    root = spec["root"]
    timeout = float(spec["timeout"])
    parallel = max(1, int(spec.get("parallel") or os.cpu_count() or 1))
    limit = int(spec.get("max_output", 65536))
    privileged = os.geteuid() == 0
    uid_base = int(spec.get("uid_base") or _UID_BASE)  # per batch: concurrent batches share no uid
    kinds = spec.get("kinds") or []
    notes: list = []
    libc = _libc()
    if libc:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of jobs come back to us for reaping
    os.makedirs(root, exist_ok=True)
    os.chmod(root, 0o711)
    results: list = [None] * n
    outputs: list = [None] * n  # (out_fd, err_fd, res_fd): read only after the last job is forked
    pending = list(range(n))[::-1]
    running: dict = {}  # pid -> [index, start, uid, timed_out, cgroup]
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])  # wait for children without polling
    gc.collect()
    gc.freeze()  # keeps the children's garbage collector off the parent's pages (fewer copy-on-write faults)
    while pending or running:
        while pending and len(running) < parallel:
            i = pending.pop()
            uid = uid_base + i if privileged else None
            try:
                group = _job_cgroup(spec, i)
            except OSError as e:
                results[i] = {"returncode": -1, "stdout": "", "stderr": "", "timed_out": False,
                              "seconds": 0.0, "error": f"setup failed: no memory cgroup ({e})"}
                continue
            try:
                # Anonymous in-memory files, close-on-exec, handed to this job only.
                fds = (os.memfd_create(f"out{i}"), os.memfd_create(f"err{i}"),
                       os.memfd_create(f"res{i}") if i < len(kinds) and kinds[i] == "calls" else None)
            except OSError as e:
                results[i] = {"returncode": -1, "stdout": "", "stderr": "", "timed_out": False,
                              "seconds": 0.0, "error": f"setup failed: {e}"}
                continue
            outputs[i] = fds
            start = time.monotonic()
            pid = os.fork()
            if pid == 0:
                _child(i, spec, fds, uid, group, os.path.join(root, f"job{i}"))
            running[pid] = [i, start, uid, False, group]
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
            i, start, uid, timed_out, group = running.pop(pid)
            try:
                os.killpg(pid, signal.SIGKILL)  # background leftovers in the job's group
            except OSError:
                pass
            if uid is not None and (timed_out or not group.dirs):
                _kill_uid(uid)  # and ones that left it (setsid, a fork bomb); a cgroup holds them all
            oom = group.oom_kills() > 0
            group.remove()
            if os.WIFEXITED(status):
                rc = os.WEXITSTATUS(status)
                error = None
            else:
                sig = os.WTERMSIG(status)
                rc = -sig
                error = None if timed_out else f"killed by signal {sig}"
            if oom:
                error = f"out of memory (limit {spec['memory_mb']} MB)"
            if timed_out:
                error = f"timed out after {timeout:g}s"
            for fd in outputs[i]:
                if fd is not None:
                    try:  # bounded memory until the end, without reading anything yet
                        keep = (MAX_RESULT if fd == outputs[i][2] else limit) + 1
                        if os.fstat(fd).st_size > keep:
                            os.ftruncate(fd, keep)
                    except OSError:
                        pass
            results[i] = {"returncode": rc, "timed_out": timed_out,
                          "seconds": time.monotonic() - start, "error": error}
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
        _sweep(uid_base, uid_base + n)
    for i in range(n):
        if outputs[i] is None:
            continue
        out_fd, err_fd, res_fd = outputs[i]
        results[i]["stdout"] = _read(out_fd, limit)
        results[i]["stderr"] = _read(err_fd, limit)
        if res_fd is not None:
            results[i]["result"] = _read(res_fd, MAX_RESULT, note=False)
    sys.stdout.write(json.dumps({"results": results, "notes": notes}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
