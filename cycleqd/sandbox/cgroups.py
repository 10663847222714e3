"""Cgroups for sandboxed work: memory, process-count and freezer (cgroup v2, or the v1 hierarchies).

A memory cgroup counts every page its processes touch, shared memory included
(``memfd_create``, ``/dev/shm``, files in a tmpfs), which the address-space rlimit does
not: a program can hold gigabytes of memfd pages with a 256 MB ``RLIMIT_AS``. So
sandboxes put their work in a cgroup of its own and keep the rlimit as a second line.
A freezer stops every process of a group at once, so that a kill of all of them cannot
be outrun by one that forks meanwhile.

:func:`make_group` finds the place this process may create cgroups in (its own
cgroup in each hierarchy), makes a child there with the given limits and gives back
a :class:`Group`; ``None`` where the host has no writable cgroup hierarchy (not root,
a read-only ``/sys/fs/cgroup``, a v2 cgroup whose memory controller cannot be
delegated). :func:`create` makes a group under folders the caller names (per-job
groups under a batch's). :func:`sweep_stale` removes groups a killed process left
behind (the next start does it).

Standard library only: the code sandbox's runner loads this file inside the sandbox.
"""
from __future__ import annotations

import os
import secrets
import shlex
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids", "freezer")


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


def bases(controllers: tuple[str, ...] = CONTROLLERS) -> dict[str, Path]:
    """Where this process may make cgroups: controller -> an existing folder (see :func:`own_cgroup`).

    v2 has no freezer controller (every v2 group has ``cgroup.freeze``), so ``freezer`` is
    absent there; :meth:`Group.freeze` uses the group's v2 folder instead.
    """
    out: dict[str, Path] = {}
    for controller in controllers:
        base = own_cgroup(controller)
        if base is not None and base.is_dir() and (not _is_v2(base) or _delegated(base, controller)):
            out[controller] = base
    return out


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


def set_frozen(d: Path, frozen: bool) -> bool:
    """Freeze (or thaw) every process of the cgroup folder ``d`` (v1 ``freezer.state``,
    v2 ``cgroup.freeze``); True once the kernel reports the state reached."""
    try:
        if (d / "freezer.state").exists():  # v1
            want = "FROZEN" if frozen else "THAWED"
            (d / "freezer.state").write_text(want)
            for _ in range(200):
                if (d / "freezer.state").read_text().strip() == want:
                    return True
                time.sleep(0.005)
            return False
        (d / "cgroup.freeze").write_text("1" if frozen else "0")  # v2
        for _ in range(200):
            if f"frozen {int(frozen)}" in (d / "cgroup.events").read_text():
                return True
            time.sleep(0.005)
    except OSError:
        pass
    return False


@dataclass
class Group:
    """One cgroup (a folder per hierarchy) this process made; :meth:`remove` deletes it.

    ``dirs`` maps a controller (``memory``, ``pids``, ``freezer``) to the folder that
    carries it (on v2 one folder carries them all).
    """

    name: str
    dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def version(self) -> int:
        """2 when the group lives in the unified hierarchy, else 1."""
        return 2 if any(_is_v2(d) for d in self.dirs.values()) else 1

    def _folders(self) -> list[Path]:
        return list(dict.fromkeys(self.dirs.values()))

    def join(self, pid: int = 0, *, strict: bool = True) -> None:
        """Move ``pid`` (0: this process, e.g. a child before exec) into the group; its later
        children follow.

        Raises:
            OSError: a folder refused it (only with ``strict``; else that folder is skipped).
        """
        for d in self._folders():
            try:
                with open(d / "cgroup.procs", "w") as f:
                    f.write(str(pid))
            except OSError:
                if strict:
                    raise

    def joining(self, argv: list[str]) -> list[str]:
        """``argv`` behind a shell that first moves itself into the group (as :meth:`join` with
        ``strict=False``), then becomes ``argv``: the join happens in the child without code run
        between fork and exec, so the caller's Python may start it with vfork."""
        join = "".join(f"echo 0 > {shlex.quote(str(d / 'cgroup.procs'))} 2>/dev/null; " for d in self._folders())
        return ["/bin/sh", "-c", f'{join}exec "$@"', "sh", *argv] if join else list(argv)

    def pids(self) -> list[int]:
        """Every process in the group and its child groups, ascending."""
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

    def _freezer(self) -> Path | None:
        d = self.dirs.get("freezer")
        if d is not None:
            return d
        return next((d for d in self._folders() if _is_v2(d)), None)

    def freeze(self, frozen: bool = True) -> bool:
        """Freeze (``frozen``) or thaw every process of the group; True once done, False
        where the group has no freezer."""
        d = self._freezer()
        return d is not None and set_frozen(d, frozen)

    def kill(self) -> None:
        """SIGKILL every process in the group and its children, the group frozen meanwhile
        (where it has a freezer) so that none forks past the kill."""
        for d in self._folders():
            if (d / "cgroup.kill").exists():  # v2: the kernel kills them all at once
                try:
                    (d / "cgroup.kill").write_text("1")
                except OSError:
                    pass
        for _ in range(20):
            if not self.pids():
                return
            frozen = self.freeze(True)
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            if frozen:
                self.freeze(False)  # frozen processes die once thawed
            time.sleep(0.01)

    def remove(self) -> None:
        """Kill what is left in the group and delete its folders (children first)."""
        self.kill()
        for d in self._folders():
            _rmtree(d)


def _rmtree(d: Path) -> None:
    try:
        d.rmdir()  # the common case: no child groups, no process left
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
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


def create(name: str, where: dict[str, Path], *, memory_mb: int | None = None, pids: int | None = None,
           freezer: bool = False, nested: bool = False) -> Group:
    """A cgroup ``name`` under each folder of ``where`` (controller -> folder) that is asked for.

    Best effort per controller: a folder whose limit does not take is removed and left
    out of the group, so the caller checks ``"memory" in group.dirs`` where memory must
    hold. ``memory_mb``: memory limit with swap off; ``pids``: process limit; ``freezer``:
    a v1 freezer folder (v2 groups can always freeze). ``nested``: v2 children of the
    group get the controllers too (a v2 group that has them may hold no process itself).
    """
    group = Group(name)
    wanted = {"memory": memory_mb, "pids": pids, "freezer": True if freezer else None}
    for controller, value in wanted.items():
        base = where.get(controller)
        if value is None or base is None or not Path(base).is_dir():
            continue
        d = Path(base) / name
        try:
            d.mkdir(exist_ok=True)
            if controller == "memory":
                _write_memory_limit(d, value)
            elif controller == "pids":
                (d / "pids.max").write_text(str(value))
            elif not (d / "freezer.state").exists():
                raise OSError("no freezer here")
            if nested and _is_v2(d):  # children of this group get the controller too (per-job groups)
                (d / "cgroup.subtree_control").write_text(f"+{controller}")
        except OSError:
            if d not in group.dirs.values():
                _rmtree(d)
            continue
        group.dirs[controller] = d
    return group


def make_group(prefix: str, *, memory_mb: int | None = None, pids: int | None = None,
               freezer: bool = False, name: str | None = None, nested: bool = True) -> Group | None:
    """A fresh cgroup with ``memory_mb`` (no swap), ``pids`` and freezer, where this process's
    own cgroups are (see :func:`create` for the arguments).

    Named ``name``, else ``<prefix>-<pid>-<random>`` (what :func:`sweep_stale` reads).
    Only the limits given are asked for; ``memory_mb`` must take, the others are best effort.
    Returns None where no memory cgroup can be made here (the caller says so and falls back),
    or where nothing at all was asked for or made.
    """
    name = name or f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
    group = create(name, bases(), memory_mb=memory_mb, pids=pids, freezer=freezer, nested=nested)
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


def _pid_alive(name: str, prefix: str) -> bool:
    """Whether the process named in ``<prefix>-<pid>-...`` runs (unparsable names count as alive)."""
    try:
        pid = int(name[len(prefix) + 1:].split("-")[0])
    except ValueError:
        return True
    return pid == os.getpid() or Path(f"/proc/{pid}").exists()


def find(name: str) -> Group:
    """The group ``name`` in this process's hierarchies, as far as its folders exist."""
    return Group(name, {c: base / name for c, base in bases().items() if (base / name).is_dir()})


def sweep_stale(prefix: str, owner_alive: Callable[[str], bool] | None = None) -> list[str]:
    """Kill and remove groups named ``<prefix>-...`` whose owner is gone; returns their names.

    ``owner_alive(name)`` decides; by default a group ``<prefix>-<pid>-...`` is stale once
    process ``pid`` is gone.
    """
    alive = owner_alive or (lambda name: _pid_alive(name, prefix))
    stale: dict[str, Group] = {}
    for controller, base in bases().items():
        try:
            found = [d for d in base.iterdir() if d.name.startswith(f"{prefix}-") and d.is_dir()]
        except OSError:
            continue
        for d in found:
            if d.name in stale or not alive(d.name):
                stale.setdefault(d.name, Group(d.name)).dirs[controller] = d
    for group in stale.values():
        group.remove()
    return sorted(stale)
