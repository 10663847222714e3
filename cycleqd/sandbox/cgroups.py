"""Memory and process-count cgroups for sandboxed work (cgroup v2, or the v1 memory / pids hierarchies).

A memory cgroup counts every page its processes touch, shared memory included
(``memfd_create``, ``/dev/shm``, files in a tmpfs), which the address-space rlimit does
not: a program can hold gigabytes of memfd pages with a 256 MB ``RLIMIT_AS``. So
sandboxes put their work in a cgroup of its own and keep the rlimit as a second line.

:func:`make_group` finds the place this process may create cgroups in (its own
cgroup in each hierarchy), makes a child there with the given limits and gives back
a :class:`Group`; ``None`` where the host has no writable cgroup hierarchy (not root,
a read-only ``/sys/fs/cgroup``, a v2 cgroup whose memory controller cannot be
delegated). Groups are named ``<prefix>-<pid>-<random>``; :func:`sweep_stale` removes
those a killed process left behind (the next start does it).
"""
from __future__ import annotations

import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def own_cgroup(controller: str) -> Path | None:
    """This process's cgroup folder for ``controller``: its v1 hierarchy, else the v2 unified one."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and controller in parts[1].split(","):
            return ROOT / controller / parts[2].lstrip("/")
    for line in lines:
        if line.startswith("0::"):
            for base in (ROOT, ROOT / "unified"):
                if (base / "cgroup.controllers").exists():
                    d = base / line[3:].lstrip("/")
                    try:
                        if controller in (d / "cgroup.controllers").read_text().split():
                            return d
                    except OSError:
                        pass
    return None


def _is_v2(d: Path) -> bool:
    return (d / "cgroup.controllers").exists()


def _delegated(base: Path, controller: str) -> bool:
    """v2: ``controller`` is on for ``base``'s children (turned on here if it may be)."""
    sub = base / "cgroup.subtree_control"
    try:
        if controller in sub.read_text().split():
            return True
        sub.write_text(f"+{controller}")  # refused (EBUSY) while base itself holds processes
        return controller in sub.read_text().split()
    except OSError:
        return False


@dataclass
class Group:
    """One cgroup (a folder per hierarchy) this process made; :meth:`remove` deletes it.

    ``dirs`` maps a controller (``memory``, ``pids``) to the folder that carries its limit.
    """

    name: str
    dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return 2 if any(_is_v2(d) for d in self.dirs.values()) else 1

    def join(self, pid: int = 0) -> None:
        """Move ``pid`` (0: this process) into the group; its later children follow."""
        for d in dict.fromkeys(self.dirs.values()):
            with open(d / "cgroup.procs", "w") as f:
                f.write(str(pid))

    def pids(self) -> list[int]:
        out: set[int] = set()
        for d in self.dirs.values():
            for dirpath, _, _ in os.walk(d):
                try:
                    out.update(int(x) for x in Path(dirpath, "cgroup.procs").read_text().split())
                except (OSError, ValueError):
                    pass
        return sorted(out)

    def oom_kills(self) -> int:
        """How many processes the kernel killed for going over the memory limit."""
        d = self.dirs.get("memory")
        if d is None:
            return 0
        for name in ("memory.events", "memory.oom_control"):
            try:
                for line in (d / name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
            except (OSError, ValueError):
                continue
        return 0

    def kill(self) -> None:
        """SIGKILL every process in the group and its children."""
        for d in dict.fromkeys(self.dirs.values()):
            try:
                (d / "cgroup.kill").write_text("1")
            except OSError:
                pass
        for _ in range(3):
            left = self.pids()
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        """Kill what is left in the group and delete its folders (children first)."""
        self.kill()
        for d in dict.fromkeys(self.dirs.values()):
            _rmtree(d)


def _rmtree(d: Path) -> None:
    if not d.exists():
        return
    subs = sorted((Path(p) for p, _, _ in os.walk(d)), key=lambda p: len(p.parts), reverse=True)
    for sub in subs:
        for _ in range(50):
            try:
                sub.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)  # the last processes are still exiting


def make_group(prefix: str, *, memory_mb: int | None = None, pids: int | None = None) -> Group | None:
    """A fresh cgroup ``<prefix>-<pid>-<random>`` with ``memory_mb`` (no swap) and ``pids`` limits.

    Only the limits given are asked for; ``memory_mb`` must take, ``pids`` is best effort.
    Returns None where no memory cgroup can be made here (the caller says so and falls back).
    """
    name = f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
    group = Group(name)
    wanted = {"memory": memory_mb, "pids": pids}
    for controller, value in wanted.items():
        if value is None:
            continue
        base = own_cgroup(controller)
        if base is None or not base.is_dir() or (_is_v2(base) and not _delegated(base, controller)):
            continue
        d = base / name
        try:
            d.mkdir(exist_ok=True)
            if _is_v2(d):  # children of this group get the controller too (per-job groups)
                (d / "cgroup.subtree_control").write_text(f"+{controller}")
            if controller == "memory":
                _write_memory_limit(d, value)
            else:
                (d / "pids.max").write_text(str(value))
        except OSError:
            _rmtree(d)
            continue
        group.dirs[controller] = d
    if memory_mb is not None and "memory" not in group.dirs:
        group.remove()
        return None
    return group if group.dirs else None


def _write_memory_limit(d: Path, memory_mb: int) -> None:
    """The memory limit of ``d`` with swap off (v2 ``memory.max``; v1 ``memory.limit_in_bytes``)."""
    limit = str(int(memory_mb) << 20)
    if _is_v2(d):
        (d / "memory.max").write_text(limit)
        for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
            try:
                (d / name).write_text(value)
            except OSError:
                pass
        return
    (d / "memory.limit_in_bytes").write_text(limit)
    try:
        (d / "memory.memsw.limit_in_bytes").write_text(limit)
    except OSError:
        pass  # no swap accounting on this host


def sweep_stale(prefix: str) -> int:
    """Remove groups named ``<prefix>-<pid>-...`` whose process is gone; returns how many."""
    removed = 0
    for controller in ("memory", "pids"):
        base = own_cgroup(controller)
        if base is None or not base.is_dir():
            continue
        for d in base.glob(f"{prefix}-*"):
            try:
                pid = int(d.name[len(prefix) + 1:].split("-")[0])
            except ValueError:
                continue
            if pid == os.getpid() or Path(f"/proc/{pid}").exists():
                continue
            Group(d.name, {controller: d}).remove()
            removed += 1
    return removed
