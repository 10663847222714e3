"""A throw-away Ubuntu-like machine for the OS-interaction task: a root bash inside
bubblewrap, plus fresh processes of the same machine.

The host's system folders (``/usr/*``, ``/bin``, ``/lib``, ...) are mounted
read-only; everything a task may change is a private writable layer for the
episode: ``/`` itself (new top-level folders), ``/etc`` (a copy of the host's
world-readable files, password hashes removed), ``/root`` (Ubuntu's skeleton
dot-files), ``/home``, ``/tmp``, ``/dev/shm``, ``/usr/local``, new files directly
in ``/usr``, ``/run`` and ``/var/{log,tmp,mail,spool,cache,local,opt}``. On an OS image
with root, ``/usr`` as a whole is a writable copy-on-write overlay of the image's.

The machine is a set of namespaces held by a resting init process: the agent's shell,
init scripts and checks are processes that enter them, each through bubblewrap into a
view of the layer. Sealed from the worker (model commands are hostile input):

- rights: with root, the machine has a user namespace of its own whose 65,536 users
  are host users ``ID_BASE`` and up, so its root is no user of the host: host files,
  ``/proc/sys``, ``/sys`` and the rest of the kernel's interfaces are what they are to
  an unknown user, and ``/proc/sys`` is also mounted read-only. Inside it, the agent
  has Docker's default capabilities minus ``CAP_MKNOD``, and no new privileges;
- environment: bubblewrap starts from a clean, minimal environment, so no process
  inside (``/proc/*/environ``) holds anything of the worker's;
- files: the host's homes, data and service folders are not there: of ``/var/lib``
  only the package databases are shown, ``/opt``, ``/srv``, ``/mnt``, ``/media``,
  ``/boot`` and ``/var``'s other folders (``/var/backups``, ...) are empty,
  ``/root`` and ``/home`` are the episode's own;
- space: with root, the whole writable layer (``/dev/shm`` included) is one
  size-limited tmpfs in a mount namespace of the episode's own, so the quota
  covers every writable place together, and System V / POSIX IPC memory is capped;
- memory and processes: where the host allows it, the episode is one cgroup whose
  memory limit covers its processes, its files and anonymous shared memory
  (``memfd``) together, with a cap on the number of processes;
- time: every process the machine gains while a command or script runs (detached
  with ``setsid``, double-forked, or the shell's own loop) is killed at its time
  limit, the machine frozen meanwhile; a shell that had to be killed is started
  again in the same folder, files kept;
- no network, an own PID namespace, address-space and file-size limits on every process.

State (working folder, variables, background jobs) persists across commands: each
command is sourced into the same shell and followed by a sentinel line carrying
its exit status.

:meth:`OSSession.run_script` is AgentBench's ``docker exec``: a new process in the
same machine (same files, processes and namespaces) with the container's environment
(``HOME=/root``, Ubuntu's ``PATH``), not the agent's shell. Once the agent has run a
command, scripts (checks) see the machine from a clean view, as ``docker exec`` sees
the image: the agent's files everywhere, but the loader, interpreters, libraries and
their start-up files the image's own (see ``_IMAGE_ETC``), the image's commands first
on ``PATH``, Python as ``python3 -I -S``.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cycleqd.atomic import write_atomic
from cycleqd.sandbox import cgroups
from cycleqd.sandbox.backends import SandboxUnavailable, bwrap_available, private_tmpfs_works
from cycleqd.sandbox.os_image import ID_BASE, ID_COUNT, build_layer, check_view, machine_view, usr_overlay
from cycleqd.sandbox.os_processes import (
    Processes,
    alive,
    children,
    descendants,
    kill_since,
    machine_processes,
    read_pending,
    readable,
    start_time,
)
from cycleqd.sandbox.os_rootfs import system_root

_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
         "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_AUDIT_WRITE", "CAP_SETFCAP"]
# Harness scripts get one capability more than the agent (a harmless one): a process may
# only trace or read the memory of one whose capabilities are a subset of its own, so the
# agent's background processes cannot tamper with a running check.
_SCRIPT_CAPS = [*_CAPS, "CAP_IPC_LOCK"]
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# No LANG: Ubuntu's container image sets none, so tools speak the C locale (find's 'quotes').
_ENV = {"HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/bash", "TERM": "dumb", "PATH": _PATH}
# What `docker exec` gives a process in an Ubuntu container: the image's PATH, root's HOME.
_EXEC_ENV = {"PATH": _PATH, "HOME": "/root", "HOSTNAME": "ubuntu"}
# Checks: the image's commands before the agent's /usr/local ones (a `python3` or `grep`
# the agent put there is not the check's), and no user site-packages or script folder on
# the path of any Python the check starts.
_CHECK_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin", "HOME": "/root",
              "HOSTNAME": "ubuntu", "PYTHONNOUSERSITE": "1", "PYTHONSAFEPATH": "1"}
# Python scripts start without `site` (-S: no .pth file or sitecustomize runs; -I: no script
# folder, user site or PYTHON* variables), given the two builtins of `site` that checks use
# (`exit`, `quit`); the script is then the `-c` program, its arguments sys.argv[1:].
_PY_BOOT = """def _cq():
    import builtins, sys, _sitebuiltins as s, __main__
    builtins.exit = s.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = s.Quitter("quit", "Ctrl-D (i.e. EOF)")
    del __main__._cq
    return compile(sys.argv.pop(1), "<string>", "exec")
exec(_cq())
"""
# Interpreters of scripts run by the harness (absolute: /usr/local is the agent's to change).
_INTERPRETERS = {"bash": ["/bin/bash", "-c"], "python": ["/usr/bin/python3", "-I", "-S", "-c", _PY_BOOT]}
# Descriptors above 2 closed before the payload runs (namespace handles of the harness).
# (No redirection around the loop: bash would keep the saved descriptor among those closed.)
_CLOSE_FDS = 'for f in /proc/$$/fd/*; do n=${f##*/}; [ "$n" -gt 2 ] && eval "exec $n<&-"; done; unset f n'
_IPC_LIMITS = {  # per IPC namespace: shared memory and message queues outside any file system
    "kernel/shmmax": 64 << 20, "kernel/shmall": (64 << 20) // 4096, "kernel/shmmni": 64,
    "kernel/msgmax": 8192, "kernel/msgmnb": 65536, "kernel/msgmni": 32,
    "fs/mqueue/queues_max": 16, "fs/mqueue/msg_max": 10, "fs/mqueue/msgsize_max": 8192,
}
_PREFIX = "cycleqd-os-"
# Seconds the agent's shell has to answer once started: a tenth of a second on an idle host,
# far more while other episodes and a model loading share two cores.
_SHELL_START_S = 90.0
# Runs as the first process of a machine (with root): a user namespace whose id maps the
# worker writes, then root in it. Plain Python (os.unshare is 3.12+), nothing imported.
_USERNS_HELPER = r"""
import ctypes, os, sys
r, w = int(sys.argv[1]), int(sys.argv[2])
if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:
    os.write(w, b"E"); sys.exit(126)
os.write(w, b"U"); os.close(w)
if os.read(r, 1) != b"G":
    sys.exit(126)
os.close(r)
os.setgroups([]); os.setresgid(0, 0, 0); os.setresuid(0, 0, 0)
os.execv(sys.argv[3], sys.argv[3:])
"""


@dataclass(frozen=True)
class ShellOutput:
    """Output (stdout and stderr together) and exit status of one command in the session."""

    output: str
    exit_code: int
    timed_out: bool


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads, while ``proc`` is not yet reaped: once it is,
    its number may be another process's (PIDs wrap quickly on a busy host), and what was left
    in its group is in the episode's cgroup, which :meth:`OSSession.close` kills."""
    if proc.poll() is None:  # not reaped: the number is still this process's, and so its group's
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass


# -- what a killed worker left ------------------------------------------------------------------
def _session_places() -> list[Path]:
    out = [Path("/dev/shm")] if os.access("/dev/shm", os.W_OK) else []
    return out + [Path(tempfile.gettempdir())]


def _owner_alive(folder: Path) -> bool:
    """Whether the worker that made the episode folder ``folder`` still runs (young folders
    without an owner record yet count as alive)."""
    try:
        pid, start = (folder / "owner").read_text().split()
        return alive(int(pid), int(start))
    except (OSError, ValueError):  # no record yet (it is written whole, by rename), or not one of ours
        try:
            return time.time() - folder.stat().st_mtime < 60
        except OSError:
            return False


def sweep_stale_sessions() -> list[str]:
    """Remove what episodes of dead workers left: their folders (``/dev/shm/cycleqd-os-*``)
    and cgroups, killing any process still in those. A worker killed with SIGKILL cannot
    clean up; the next session started on the host does it. Returns the names removed."""
    live: set[str] = set()
    dead: list[Path] = []
    for place in _session_places():
        try:
            entries = [e for e in place.iterdir() if e.name.startswith(_PREFIX)]
        except OSError:
            continue
        for folder in entries:
            if _owner_alive(folder):
                live.add(folder.name)
            else:
                dead.append(folder)
    gone = {folder.name for folder in dead}

    def owner_alive(name: str) -> bool:  # a folder made since the scan above is a starting episode's
        return name in live or (name not in gone and any((p / name).exists() for p in _session_places()))

    # processes first (cgroups of dead episodes, and those whose folder is already gone), then files
    removed = set(cgroups.sweep_stale(_PREFIX.rstrip("-"), owner_alive))
    for folder in dead:
        shutil.rmtree(folder, ignore_errors=True)
        removed.add(folder.name)
    return sorted(removed)


class OSSession:
    """A root bash in its own Ubuntu-like machine (see module docstring). Close it when done.

    Args:
        memory_mb: address-space limit for every process of the episode.
        disk_mb: quota of the whole writable layer (all writable places together).
        max_processes: processes the episode may have at once (where cgroups can be made).
        cwd: folder the shell starts in.
        launch: start the machine now; with False only the layer is built (slow part, safe in
            any thread) and :meth:`launch` must be called later, from a thread that outlives
            the session (bwrap dies with the thread that started it).
        image: the OS image the machine runs (``default``, ``packages``: see
            :mod:`cycleqd.sandbox.os_rootfs`), built on first use where it is missing; where
            it cannot be built (or with None) the host's system folders, said once per process.

    Raises:
        SandboxUnavailable: bubblewrap is missing, or the machine does not start.
    """

    def __init__(self, *, memory_mb: int = 2048, disk_mb: int = 1024, max_processes: int = 1024,
                 cwd: str = "/root", launch: bool = True, image: str | None = "default"):
        if not bwrap_available():
            raise SandboxUnavailable("the OS task needs bubblewrap (apt-get install bubblewrap)")
        sweep_stale_sessions()
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.dir = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=shm))
        # whole or not at all: a sweeping thread that read a half-written record would take it for a dead owner's
        write_atomic(self.dir / "owner", f"{os.getpid()} {start_time(os.getpid())}\n", durable=False)
        self.ctl = self.dir / "ctl"
        self.prep = self.dir / "prep"  # the layer's initial content
        self.image = self.dir / "image"  # the image's own copies of what checks must not take from the agent
        # Where the layer lives while the machine runs: with root a tmpfs of disk_mb mounted
        # in the episode's own mount namespace (the host never sees it), else prep itself.
        self.quota = private_tmpfs_works()
        # With root the machine's users are host users ID_BASE.. (its root is not the host's).
        self.mapped = os.geteuid() == 0
        self.layer = self.dir / "layer" if self.quota else self.prep
        self.disk_mb, self.max_processes = int(disk_mb), int(max_processes)
        self.cgroup = cgroups.Group(self.dir.name)  # the episode's (empty where the host has none)
        self.alive = False
        self.proc: subprocess.Popen | None = None  # the machine (bubblewrap holding its init)
        self.shell: subprocess.Popen | None = None  # the agent's shell
        self.memory_mb, self.cwd = memory_mb, cwd
        self._buf = b""
        self._nsfds: dict[str, int] = {}
        self._agent_ran = False
        self._shell_pid: int | None = None
        self._init_pid: int | None = None
        self.timeouts = 0  # commands and checks killed at their time limit (load shows here)
        root = system_root(image) if image is not None else None
        self.sys_root = str(root) if root is not None else "/"  # the machine's system: image or host
        try:
            build_layer(self.dir, quota=self.quota, mapped=self.mapped, sys_root=self.sys_root)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        if launch:
            self.launch()

    # -- start -------------------------------------------------------------------------------
    def launch(self) -> None:
        """Start the episode's machine and shell (see ``launch`` in the class docstring).

        Raises:
            SandboxUnavailable: the machine does not start on this host.
        """
        # Processes, their memory and the layer's files together (the layer is charged to it).
        self.cgroup = cgroups.create(self.dir.name, cgroups.bases(), memory_mb=self.memory_mb + self.disk_mb + 256,
                                     pids=self.max_processes, freezer=True)
        try:
            self._start_machine()
            self.alive = True
            self._start_shell(self.cwd)
        except BaseException:
            self.close()
            raise

    def _confined(self, argv: list[str]) -> list[str]:
        """``argv`` in the episode's cgroup and under its limits (address space, no core files, files of
        at most 256 MB), set by exec wrappers (``sh`` joining the group, ``prlimit``) rather than by code
        between fork and exec. Without that code Python starts the process with vfork: a worker holding
        a model's gigabytes forks slowly (its page tables are copied), several times per episode."""
        mem = self.memory_mb << 20
        return self.cgroup.joining([shutil.which("prlimit") or "prlimit", f"--as={mem}", "--core=0",
                                    f"--fsize={256 << 20}", "--", *argv])

    def _start_machine(self) -> None:
        """The init that holds the machine's namespaces (bwrap's PID 1 and a resting ``sleep``)."""
        bwrap = shutil.which("bwrap") or "bwrap"
        ns = ["--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "ubuntu"]
        if not self.quota:
            ns.append("--unshare-ipc")
        if not self.mapped:
            ns += ["--unshare-user", "--uid", "0", "--gid", "0"]
        argv = [bwrap, *ns, *machine_view(self.layer, self.ctl, sys_root=self.sys_root), *self._common("/", _CAPS, _ENV),
                "/usr/bin/sleep", "infinity"]
        if self.quota:
            argv = [*self._wrapper(), *argv]
        log = open(self.dir / "machine.log", "wb")
        sync: tuple[int, int] | None = None
        try:
            if self.mapped:
                r1, w1 = os.pipe()
                r2, w2 = os.pipe()
                sync = (r1, w2)
                argv = [sys.executable, "-I", "-S", "-c", _USERNS_HELPER, str(r2), str(w1), *argv]
                fds: tuple[int, ...] = (r2, w1)
            else:
                fds = ()
            self.proc = subprocess.Popen(self._confined(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         pass_fds=fds, start_new_session=True, env=dict(_ENV), cwd="/")
            if sync is not None:
                os.close(r2)
                os.close(w1)
                ready = readable(r1, 30) and os.read(r1, 1)
                if ready != b"U":
                    raise SandboxUnavailable("the OS machine could not make a user namespace")
                for kind in ("uid", "gid"):
                    with open(f"/proc/{self.proc.pid}/{kind}_map", "w") as f:
                        f.write(f"0 {ID_BASE} {ID_COUNT}\n")
                os.write(w2, b"G")
        finally:
            log.close()
            if sync is not None:
                for fd in sync:
                    os.close(fd)
        own = os.readlink("/proc/self/ns/pid")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            for pid in sorted(children(self.proc.pid)):
                try:
                    if os.readlink(f"/proc/{pid}/ns/pid") != own and children(pid):
                        self._init_pid = pid
                except OSError:
                    continue
            if self._init_pid:
                break
            time.sleep(0.01)
        if not self._init_pid:
            why = (self.dir / "machine.log").read_text(errors="replace")[-500:]
            raise SandboxUnavailable(f"the OS machine did not start: {why}")
        init = self._init_pid
        for kind in ("user", "net", "ipc", "uts", "cgroup"):
            if os.readlink(f"/proc/{init}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}"):
                self._nsfds[kind] = os.open(f"/proc/{init}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
        if self.quota:  # the mount namespace that holds the layer's tmpfs
            self._nsfds["mount"] = os.open(f"/proc/{self.proc.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        self._nsfds["pid"] = os.open(f"/proc/{init}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self._pidns = os.readlink(f"/proc/{init}/ns/pid")
        if not alive(init, start_time(init)):
            raise SandboxUnavailable("the OS machine ended while starting")

    def _wrapper(self) -> list[str]:
        """With root: a private mount and IPC namespace holding the layer's tmpfs, then bwrap."""
        ipc = " && ".join(f"echo {v} > /proc/sys/{k}" for k, v in _IPC_LIMITS.items())
        overlay = ""
        if self.sys_root != "/" and usr_overlay(self.layer):  # /usr: the image's, writable copy-on-write
            # where the kernel refuses the overlay, the image's /usr read-only (as without root)
            overlay = ('&& { mount -t overlay cycleqd-usr -o "lowerdir=$3/usr,upperdir=$1/usr_upper,workdir=$1/usr_work" '
                       '"$1/usr" 2>/dev/null || { mount --bind "$3/usr" "$1/usr" && mount -o remount,bind,ro "$1/usr"; }; } ')
        # the machine starts only on its layer: where the tmpfs or the copy fails, the wrapper says so and stops
        script = (f'{{ mount -t tmpfs -o size={self.disk_mb}m,mode=0755 cycleqd-layer "$1" && cp -a "$2"/. "$1"/ '
                  f'{overlay}; }} || {{ echo "cycleqd: the layer could not be made" >&2; exit 125; }}; '
                  f"{{ {ipc}; }} 2>/dev/null; shift 3; exec \"$@\"")
        return [shutil.which("unshare") or "unshare", "--mount", "--ipc", "--propagation", "private",
                "/bin/sh", "-c", script, "sh", str(self.layer), str(self.prep), self.sys_root]

    def _state(self) -> str:
        """The layer as the worker reaches it (with root it is mounted in the machine's namespace)."""
        return f"/proc/{self.proc.pid}/root{self.layer}" if self.quota else str(self.layer)

    def _common(self, cwd: str, caps: list[str], env: dict[str, str]) -> list[str]:
        a = ["--die-with-parent", "--new-session", "--chdir", cwd, "--clearenv"]
        for k, v in env.items():
            a += ["--setenv", k, v]
        return a + ["--cap-drop", "ALL"] + [x for c in caps for x in ("--cap-add", c)] + ["--"]

    def _enter(self, view: str, caps: list[str], env: dict[str, str], cwd: str) -> tuple[list[str], list[int], list[int]]:
        """argv prefix that runs a command in the machine in ``view`` ("machine" or "check"),
        the descriptors it needs, and those of them to close once it started."""
        fds: list[int] = []
        opened: list[int] = []
        args = (machine_view(self.layer, self.ctl, self._state(), self.sys_root) if view == "machine"
                else check_view(self.layer, self.image, self._state(), opened, self.sys_root))
        fds += opened
        args = ["--pidns", str(self._nsfds["pid"]), *args, *self._common(cwd, caps, env)]
        argfile = tempfile.TemporaryFile(dir=self.dir)
        argfile.write(b"\0".join(a.encode() for a in args[:-1]) + b"\0")
        argfile.seek(0)
        afd = os.dup(argfile.fileno())
        argfile.close()
        fds.append(afd)
        opened.append(afd)
        nsenter = [shutil.which("nsenter") or "nsenter"]
        names = {"user": "--user", "net": "--net", "ipc": "--ipc", "uts": "--uts", "cgroup": "--cgroup",
                 "mount": "--mount"}
        for kind, fd in self._nsfds.items():
            if kind in names:
                nsenter.append(f"{names[kind]}=/proc/self/fd/{fd}")
                fds.append(fd)
        fds.append(self._nsfds["pid"])
        return [*nsenter, "--", shutil.which("bwrap") or "bwrap", "--args", str(afd), "--"], fds, opened

    def _start_shell(self, cwd: str) -> None:
        """The agent's shell, in ``cwd``; tried twice, since a host busy enough (other episodes,
        a model loading) can stall a start that takes a tenth of a second when idle.

        Raises:
            SandboxUnavailable: no shell answered, with why (its exit, whether the start
                timed out, the episode's memory kills, the machine's state and log).
        """
        failures: list[str] = []
        for _ in range(2):
            why = self._shell_once(cwd)
            if why is None:
                return
            failures.append(why)
            self._drop_shell()
            if self.proc is None or self.proc.poll() is not None:  # the machine itself is gone
                break
            self.alive = True  # the failed start marked the session dead; the machine still runs
        machine = "running" if self.proc is not None and self.proc.poll() is None else "ended"
        try:
            log = (self.dir / "machine.log").read_text(errors="replace")[-300:]
        except OSError:
            log = ""
        raise SandboxUnavailable(f"the OS machine's shell did not start ({'; then '.join(failures)}; "
                                 f"machine {machine}, machine log: {log!r})")

    def _shell_once(self, cwd: str) -> str | None:
        """Start the shell and wait for its first answer; None once it answered, else why not."""
        argv, fds, opened = self._enter("machine", _CAPS, _ENV, "/root")
        try:
            self.shell = subprocess.Popen(
                self._confined([*argv, "/bin/bash", "-c", f"{_CLOSE_FDS}; exec /bin/bash --noprofile --norc"]),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                env=dict(_ENV), cwd="/", pass_fds=fds)
        finally:
            for fd in opened:
                os.close(fd)
        self._buf = b""
        self._shell_pid = None
        setup = f"exec 2>&1; set +m; shopt -s expand_aliases; cd -- {shlex.quote(cwd)} 2>/dev/null"
        started, kills = time.monotonic(), self.cgroup.oom_kills()
        r = self._run(setup, _SHELL_START_S, agent=False)
        if r.exit_code == -1:
            took = time.monotonic() - started
            try:
                self.shell.wait(timeout=5)  # its exit status, for the message
            except subprocess.TimeoutExpired:
                pass
            return (f"shell exit {self.shell.poll()} after {took:.1f} s"
                    f"{' (timed out)' if r.timed_out else ''}, {self.cgroup.oom_kills() - kills} memory kills, "
                    f"output {r.output[-200:]!r}")
        for pid in sorted(descendants(self.shell.pid)):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "bash":
                        self._shell_pid = pid
                        break
            except OSError:
                continue
        return None

    def _drop_shell(self) -> None:
        """Kill the agent's shell (while it is still ours: never a number the kernel gave another
        process since) and close its pipes."""
        if self.shell is None:
            return
        if self._shell_pid and self.shell.poll() is None:  # the shell's bwrap lives, so its bash is still its own
            try:
                os.kill(self._shell_pid, signal.SIGKILL)
            except OSError:
                pass
        _kill_group(self.shell)
        try:
            self.shell.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.shell.stdin, self.shell.stdout):
            try:
                f.close()
            except OSError:
                pass

    # -- processes of the machine ------------------------------------------------------------
    def _processes(self) -> Processes:
        """(pid, start time) of every process in the machine, wherever it was reparented."""
        return machine_processes(self._pidns, self.cgroup.pids())

    def _kill_since(self, before: Processes, keep: set[int] = frozenset()) -> None:
        """Kill every process the machine gained since ``before`` except ``keep`` (see
        :func:`~cycleqd.sandbox.os_processes.kill_since`)."""
        kill_since(self._processes, before, self.cgroup, keep=keep, roots=(self._init_pid, self._shell_pid))

    def _machine_alive(self) -> bool:
        return self.alive and self.proc is not None and self.proc.poll() is None

    def _restart_shell(self) -> None:
        """A shell stuck in a loop of its own: kill it and start another in its folder."""
        cwd = "/root"
        if self._shell_pid:
            try:
                cwd = os.readlink(f"/proc/{self._shell_pid}/cwd")
            except OSError:
                pass
        self._drop_shell()
        try:
            self._start_shell(cwd if cwd.startswith("/") else "/root")
        except SandboxUnavailable:
            self.alive = False

    # -- commands ----------------------------------------------------------------------------
    def run(self, command: str, timeout: float = 10.0) -> ShellOutput:
        """Evaluate ``command`` in the session shell; output is stdout+stderr together.

        Past ``timeout`` seconds every process the machine gained meanwhile is killed and
        ``timed_out`` is set; a shell busy in a loop of its own is replaced by a new one in
        the same folder (``exit_code`` -1). If the shell itself is gone (``exit``),
        ``exit_code`` is -1.
        """
        return self._run(command, timeout, agent=True)

    def _run(self, command: str, timeout: float, agent: bool) -> ShellOutput:
        if not self._machine_alive() or self.shell is None or self.shell.poll() is not None:
            self.alive = False
            return ShellOutput("", -1, False)
        if agent:
            self._agent_ran = True
        nonce = uuid.uuid4().hex
        (self.ctl / nonce).write_text(command + "\n")
        before = self._processes()
        script = (f'eval "$(< /run/cycleqd/{nonce})" </dev/null\n'
                  f"printf '\\n__CQ_DONE_{nonce}_%s\\n' \"$?\"\n")
        try:
            self.shell.stdin.write(script.encode())
            self.shell.stdin.flush()
        except (BrokenPipeError, OSError):
            self.alive = False
            return ShellOutput("", -1, False)
        sentinel = re.compile(rb"\n__CQ_DONE_" + nonce.encode() + rb"_(\d+)\n")
        deadline = time.monotonic() + timeout
        timed_out = False
        fd = self.shell.stdout.fileno()
        try:
            while True:
                m = sentinel.search(self._buf)
                if m:
                    out, self._buf = self._buf[:m.start()], self._buf[m.end():]
                    return ShellOutput(out.decode("utf-8", errors="replace"), int(m.group(1)), timed_out)
                left = deadline - time.monotonic()
                if left <= 0:
                    if timed_out:  # the shell itself is busy: replace it, files kept (a starting one: give up)
                        out, self._buf = self._buf, b""
                        self._kill_since(before)
                        if agent:
                            self._restart_shell()
                        return ShellOutput(out.decode("utf-8", errors="replace"), -1, True)
                    timed_out = True
                    self.timeouts += 1
                    self._kill_since(before, keep={self._shell_pid} if self._shell_pid else set())
                    deadline = time.monotonic() + 2.0
                    continue
                r = readable(fd, min(left, 0.5))
                if r:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        self.alive = False
                        out, self._buf = self._buf, b""
                        return ShellOutput(out.decode("utf-8", errors="replace"), -1, timed_out)
                    self._buf += chunk
                    if len(self._buf) > 4 << 20:  # runaway output: keep the head and the tail
                        self._buf = self._buf[:1 << 20] + self._buf[-(1 << 20):]
        finally:
            (self.ctl / nonce).unlink(missing_ok=True)

    def run_script(self, language: str, script: str, params: list[str], timeout: float = 30.0, *,
                   view: str | None = None) -> ShellOutput:
        """Run a script as a new process of this machine (AgentBench's ``execute_independent``).

        Like ``docker exec``: the same files, processes and namespaces as the agent's
        shell, the container's environment and root's home as working folder, with the
        episode's limits; ``bash`` scripts get ``params`` after ``--``, ``python`` scripts
        as arguments. Output is stdout and stderr together. Past ``timeout`` every process
        the machine gained meanwhile is killed.

        ``view``: ``"machine"`` (the machine as the agent left it: init scripts) or
        ``"check"`` (the image's system, loader and start-up files with the agent's files;
        see the module docstring). Default: ``"check"`` once the agent's shell has run a
        command, ``"machine"`` before.

        Raises:
            ValueError: a language other than bash or python, or an unknown view.
        """
        if language not in _INTERPRETERS:
            raise ValueError(f"unsupported script language {language!r}")
        view = view or ("check" if self._agent_ran else "machine")
        if view not in ("machine", "check"):
            raise ValueError(f"unknown view {view!r} (machine or check)")
        if not self._machine_alive():
            return ShellOutput("", -1, False)
        argv = [*_INTERPRETERS[language], script, *(["--"] if language == "bash" else []), *map(str, params)]
        env = _CHECK_ENV if view == "check" else _EXEC_ENV
        before = self._processes()
        try:
            enter, fds, opened = self._enter(view, _SCRIPT_CAPS, env, "/root")
        except OSError as e:
            return ShellOutput(f"could not enter the machine: {e}", -1, False)
        try:
            command = [*enter, "/bin/bash", "-c", f'{_CLOSE_FDS}; exec "$@"', "bash", *argv]
            proc = subprocess.Popen(self._confined(command),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=dict(env), cwd="/", pass_fds=fds)
        except OSError as e:
            return ShellOutput(f"could not start a process in the machine: {e}", -1, False)
        finally:
            for fd in opened:
                os.close(fd)
        out = bytearray()
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        timed_out = False
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    self.timeouts += 1
                    break
                ready = readable(fd, min(left, 0.05))
                if ready:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    if len(out) < 4 << 20:
                        out += chunk
                elif proc.poll() is not None:
                    # Done. Background processes it started live on (as after `docker exec`),
                    # even while they hold its output open, so no end of file is waited for.
                    read_pending(fd, out, 4 << 20)
                    break
        finally:
            if timed_out:
                self._kill_since(before)
                _kill_group(proc)
            proc.stdout.close()
        code = proc.wait()
        text = bytes(out).decode("utf-8", errors="replace")
        return ShellOutput(text, -1 if timed_out else code, timed_out)

    def close(self) -> None:
        """Kill everything in the episode and delete its layer."""
        for p in (self.shell, self.proc):
            if p is not None:
                _kill_group(p)
        for p in (self.shell, self.proc):
            if p is not None:
                try:
                    p.wait(timeout=10)
                except Exception:
                    pass
                for f in (p.stdin, p.stdout):
                    if f is not None:
                        try:
                            f.close()
                        except OSError:
                            pass
        self.alive = False
        for fd in self._nsfds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._nsfds = {}
        self.cgroup.remove()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "OSSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
