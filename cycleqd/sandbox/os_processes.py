"""Process bookkeeping of an OS-task machine, read from the host's ``/proc``.

A process is named by its pid and start time together (a pid alone can be reused). The
machine's processes are those in its PID namespace or its cgroup; :func:`kill_since` ends
every one a command or check gained, the machine frozen meanwhile.
"""
from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable, Iterable

from cycleqd.sandbox.cgroups import Group

Processes = set[tuple[int, int]]  # (pid, start time)


def _stat_field(pid: int, index: int) -> int | None:
    """Field ``index`` of ``/proc/<pid>/stat`` counted from the state (0: state, 1: parent, 19: start time)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[index])
    except (OSError, ValueError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (pid and start time name one process)."""
    return _stat_field(pid, 19)


def parent(pid: int) -> int | None:
    """The parent pid of ``pid`` (None once it is gone)."""
    return _stat_field(pid, 1)


def alive(pid: int, start: int | None) -> bool:
    """Whether the process ``pid`` that started at ``start`` still runs (not a later one with its pid)."""
    return start is not None and start_time(pid) == start


def children(pid: int) -> set[int]:
    """The children of every thread of ``pid``."""
    out: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(x) for x in f.read().split())
    except OSError:
        pass
    return out


def descendants(pid: int) -> set[int]:
    """Children of ``pid``, their children, and so on."""
    seen: set[int] = set()
    todo = [pid]
    while todo:
        for c in children(todo.pop()):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` has data (or end of file) within ``timeout`` seconds. ``poll``, not
    ``select``: a worker playing many episodes at once holds descriptors above 1,024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def read_pending(fd: int, out: bytearray, cap: int) -> None:
    """Append to ``out`` (up to ``cap`` bytes) what the pipe ``fd`` holds now, without waiting.

    A process can write its last output and exit between a reader's wait and its exit
    check; that output is still in the pipe and belongs to the result.
    """
    while len(out) < cap and readable(fd, 0):
        chunk = os.read(fd, min(65536, cap - len(out)))
        if not chunk:
            return
        out += chunk


def machine_processes(pidns: str, pids: Iterable[int] = ()) -> Processes:
    """(pid, start time) of every process in the PID namespace ``pidns`` (``readlink`` of its
    ``/proc/<pid>/ns/pid``) and of ``pids`` (the machine's cgroup), wherever it was reparented."""
    found = set(pids)
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/ns/pid") == pidns:
                    found.add(int(name))
            except OSError:
                continue
    out: Processes = set()
    for pid in found:
        st = start_time(pid)
        if st is not None:
            out.add((pid, st))
    return out


def kill_since(processes: Callable[[], Processes], before: Processes, group: Group, *,
               keep: Iterable[int] = (), roots: Iterable[int | None] = ()) -> None:
    """Kill every process ``processes()`` lists that is not in ``before`` (except ``keep``), the
    cgroup ``group`` frozen meanwhile (where it can be) so that none forks past the kill.

    A new process is spared only while its parent chain leads to a process that was
    already running other than ``roots`` (the shell and the machine's init): a child that an
    earlier background job starts now. Anything detached (``setsid``, double fork,
    reparented to init) cannot be told apart from the command's own and is killed.
    """
    keep, roots = set(keep), set(roots)
    frozen = group.freeze(True)
    try:
        _kill_new(processes(), before, keep, roots)
    finally:
        if frozen:
            group.freeze(False)
    for _ in range(50):
        if not _kill_new(processes(), before, keep, roots):
            return
        time.sleep(0.02)


def _kill_new(procs: Processes, before: Processes, keep: set[int], roots: set[int | None]) -> bool:
    old = {pid for pid, _ in procs & before}
    new = {pid for pid, _ in procs - before}
    killed = False
    for pid in new - keep:
        up, spared = pid, False
        for _ in range(64):
            up = parent(up)
            if up in old:
                spared = up not in roots
                break
            if up not in new:
                break
        if not spared:
            try:
                os.kill(pid, signal.SIGKILL)
                killed = True
            except OSError:
                pass
    return killed
