"""A throw-away Ubuntu-like machine for the OS-interaction task: a root bash inside
bubblewrap, plus fresh processes of the same machine.

The host's system folders (``/usr/*``, ``/bin``, ``/lib``, ...) are mounted
read-only; everything a task may change is a private writable layer for the
episode: ``/`` itself (new top-level folders), ``/etc`` (a copy of the host's
world-readable files, password hashes removed), ``/root`` (Ubuntu's skeleton
dot-files), ``/home``, ``/tmp``, ``/dev/shm``, ``/usr/local``, new files directly
in ``/usr``, ``/run`` and ``/var/{log,tmp,mail,spool,cache,local,opt}``.

The machine is a set of namespaces held by a resting init process: the agent's shell,
init scripts and checks are processes that enter them, each through bubblewrap into a
view of the layer. Sealed from the worker (model commands are hostile input):

- rights: with root, the machine has a user namespace of its own whose 65,536 users
  are host users ``_ID_BASE`` and up, so its root is no user of the host: host files,
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
import resource
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cycleqd.sandbox import cgroups
from cycleqd.sandbox.backends import SandboxUnavailable, bwrap_available, private_tmpfs_works

_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
         "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_AUDIT_WRITE", "CAP_SETFCAP"]
# Harness scripts get one capability more than the agent (a harmless one): a process may
# only trace or read the memory of one whose capabilities are a subset of its own, so the
# agent's background processes cannot tamper with a running check.
_SCRIPT_CAPS = [*_CAPS, "CAP_IPC_LOCK"]
_RO_TOP = {"bin", "sbin", "lib", "lib32", "lib64", "libx32"}
_EMPTY_TOP = ("opt", "srv", "media", "mnt", "boot")  # Ubuntu's image has them empty; hosts keep data there
_VAR_RW = ("log", "tmp", "mail", "spool", "cache", "local", "opt")
# Of /var/lib only what package tools read; everything else there is some service's data.
_VAR_LIB = ("dpkg", "apt", "ucf", "pam", "misc", "shells.state")
# Top-level names the views build themselves (never taken from the agent's root folder).
_MANAGED_TOP = _RO_TOP | {"usr", "etc", "root", "home", "tmp", "run", "var", "proc", "dev", "sys"}
# /etc entries that decide which code runs: the dynamic loader's configuration, the
# targets of /usr's symlinks into /etc (alternatives: awk, editor, ...; Python's
# sitecustomize; Java's and Maven's set-up), module loaders (PAM, NSS). Checks see the
# image's; an absent one stays absent (/etc/ld.so.preload).
_IMAGE_ETC = {"ld.so.preload", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "nsswitch.conf",
              "pam.d", "pam.conf", "security", "maven", "X11", "groff", "environment"}
_IMAGE_ETC_PREFIX = ("python", "java", "perl", "ld.so")
# Files Python looks for beside its executable's folder (/usr/pyvenv.cfg would move its stdlib).
_IMAGE_ABSENT_USR = {"pyvenv.cfg", "local"}
_MAX_ENTRIES = 400  # per folder a check view composes (more only hurts the agent: the check sees fewer)
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV = {"HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/bash", "TERM": "dumb",
        "LANG": "C.UTF-8", "PATH": _PATH}
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
_ID_BASE = 1 << 30  # host uid/gid of the machine's root (with root): its user n is host user _ID_BASE + n
_ID_COUNT = 1 << 16
_PREFIX = "cycleqd-os-"
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


def _copy_etc(dst: Path) -> None:
    """The host's /etc as a private copy: world-readable files only (secrets are not),
    plus the password databases with every hash removed."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        out = set()
        for n in names:
            p = os.path.join(folder, n)
            try:
                st = os.lstat(p)
            except OSError:
                out.add(n)
                continue
            if stat.S_ISLNK(st.st_mode):
                continue
            if not st.st_mode & stat.S_IROTH or (stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH):
                if not (folder == "/etc" and n in ("shadow", "gshadow")):
                    out.add(n)
        return out

    shutil.copytree("/etc", dst, symlinks=True, ignore_dangling_symlinks=True, ignore=ignore)
    _scrub_passwords(dst / "shadow")
    _scrub_passwords(dst / "gshadow")


def _image_etc(name: str) -> bool:
    return name in _IMAGE_ETC or name.startswith(_IMAGE_ETC_PREFIX)


def _chown_tree(root: Path, base: int) -> None:
    """Give a tree to the machine's users: host owner n becomes ``base + n`` (n < 65,536)."""
    def own(p: str) -> None:
        st = os.lstat(p)
        uid = st.st_uid if st.st_uid < _ID_COUNT else _ID_COUNT - 2
        gid = st.st_gid if st.st_gid < _ID_COUNT else _ID_COUNT - 2
        os.lchown(p, base + uid, base + gid)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(p, stat.S_IMODE(st.st_mode))  # chown clears set-id bits; keep the mode

    own(str(root))
    for folder, dirs, files in os.walk(root):
        for n in dirs + files:
            own(os.path.join(folder, n))


# -- processes ---------------------------------------------------------------------------------
def _start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (pid and start time name one process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    return start is not None and _start_time(pid) == start


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(x) for x in f.read().split())
    except OSError:
        pass
    return out


def _descendants(pid: int) -> set[int]:
    seen: set[int] = set()
    todo = [pid]
    while todo:
        for c in _children(todo.pop()):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def read_pending(fd: int, out: bytearray, cap: int) -> None:
    """Append to ``out`` (up to ``cap`` bytes) what the pipe ``fd`` holds now, without waiting.

    A process can write its last output and exit between a reader's wait and its exit
    check; that output is still in the pipe and belongs to the result.
    """
    while len(out) < cap and select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, min(65536, cap - len(out)))
        if not chunk:
            return
        out += chunk


def _scrub_passwords(path: Path) -> None:
    if not path.exists():
        return
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            parts[1] = "*" if parts[1] not in ("", "!", "*") else parts[1]
        lines.append(":".join(parts))
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o640)


# -- what a killed worker left ------------------------------------------------------------------
def _session_places() -> list[Path]:
    out = [Path("/dev/shm")] if os.access("/dev/shm", os.W_OK) else []
    return out + [Path(tempfile.gettempdir())]


def _owner_alive(folder: Path) -> bool:
    """Whether the worker that made the episode folder ``folder`` still runs (young folders
    without an owner record yet count as alive)."""
    try:
        pid, start = (folder / "owner").read_text().split()
        return _alive(int(pid), int(start))
    except FileNotFoundError:
        try:
            return time.time() - folder.stat().st_mtime < 60
        except OSError:
            return False
    except (OSError, ValueError):
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

    Raises:
        SandboxUnavailable: bubblewrap is missing, or the machine does not start.
    """

    def __init__(self, *, memory_mb: int = 2048, disk_mb: int = 1024, max_processes: int = 1024,
                 cwd: str = "/root", launch: bool = True):
        if not bwrap_available():
            raise SandboxUnavailable("the OS task needs bubblewrap (apt-get install bubblewrap)")
        sweep_stale_sessions()
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.dir = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=shm))
        (self.dir / "owner").write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
        self.ctl = self.dir / "ctl"
        self.prep = self.dir / "prep"  # the layer's initial content
        self.image = self.dir / "image"  # the image's own copies of what checks must not take from the agent
        # Where the layer lives while the machine runs: with root a tmpfs of disk_mb mounted
        # in the episode's own mount namespace (the host never sees it), else prep itself.
        self.quota = private_tmpfs_works()
        # With root the machine's users are host users _ID_BASE.. (its root is not the host's).
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
        try:
            self._build_layer()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        if launch:
            self.launch()

    # -- layer -------------------------------------------------------------------------------
    def _build_layer(self) -> None:
        d = self.prep
        d.mkdir()
        (d / "rootfs").mkdir()
        _copy_etc(d / "etc")
        for sub in ("root", "home", "tmp", "usr_local", "run", "dev_shm", *(f"var_{v}" for v in _VAR_RW)):
            (d / sub).mkdir()
        (d / "root").chmod(0o700)
        for sub in ("tmp", "var_tmp", "dev_shm"):
            (d / sub).chmod(0o1777)
        for name in (".bashrc", ".profile"):  # as in Ubuntu's image
            if os.path.isfile(f"/etc/skel/{name}"):
                shutil.copy(f"/etc/skel/{name}", d / "root" / name)
        for sub in ("bin", "sbin", "lib", "share", "include", "src", "etc"):
            (d / "usr_local" / sub).mkdir()
        (self.image / "etc").mkdir(parents=True)
        for name in os.listdir(d / "etc"):
            if _image_etc(name):
                src = d / "etc" / name
                if src.is_dir() and not src.is_symlink():
                    shutil.copytree(src, self.image / "etc" / name, symlinks=True)
                else:
                    shutil.copy2(src, self.image / "etc" / name, follow_symlinks=False)
        if self.quota:
            (self.dir / "layer").mkdir()
        self.ctl.mkdir(mode=0o700)
        if self.mapped:
            _chown_tree(d, _ID_BASE)
            _chown_tree(self.image, _ID_BASE)
            for p in (self.dir, self.ctl, *([self.dir / "layer"] if self.quota else [])):
                os.chown(p, _ID_BASE, _ID_BASE)

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

    def _child_setup(self):
        mem, group = self.memory_mb, self.cgroup

        def child() -> None:
            _limit(mem)
            group.join(strict=False)
        return child

    def _start_machine(self) -> None:
        """The init that holds the machine's namespaces (bwrap's PID 1 and a resting ``sleep``)."""
        bwrap = shutil.which("bwrap") or "bwrap"
        ns = ["--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "ubuntu"]
        if not self.quota:
            ns.append("--unshare-ipc")
        if not self.mapped:
            ns += ["--unshare-user", "--uid", "0", "--gid", "0"]
        argv = [bwrap, *ns, *self._machine_view(fresh=True), *self._common("/", _CAPS, _ENV),
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
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=fds,
                                         start_new_session=True, preexec_fn=self._child_setup(),
                                         env=dict(_ENV), cwd="/")
            if sync is not None:
                os.close(r2)
                os.close(w1)
                ready = select.select([r1], [], [], 30)[0] and os.read(r1, 1)
                if ready != b"U":
                    raise SandboxUnavailable("the OS machine could not make a user namespace")
                for kind in ("uid", "gid"):
                    with open(f"/proc/{self.proc.pid}/{kind}_map", "w") as f:
                        f.write(f"0 {_ID_BASE} {_ID_COUNT}\n")
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
            for pid in sorted(_children(self.proc.pid)):
                try:
                    if os.readlink(f"/proc/{pid}/ns/pid") != own and _children(pid):
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
        if not _alive(init, _start_time(init)):
            raise SandboxUnavailable("the OS machine ended while starting")

    def _wrapper(self) -> list[str]:
        """With root: a private mount and IPC namespace holding the layer's tmpfs, then bwrap."""
        ipc = " && ".join(f"echo {v} > /proc/sys/{k}" for k, v in _IPC_LIMITS.items())
        script = (f'mount -t tmpfs -o size={self.disk_mb}m,mode=0755 cycleqd-layer "$1" && cp -a "$2"/. "$1"/ '
                  f"&& {{ {ipc}; }} 2>/dev/null; shift 2; exec \"$@\"")
        return [shutil.which("unshare") or "unshare", "--mount", "--ipc", "--propagation", "private",
                "/bin/sh", "-c", script, "sh", str(self.layer), str(self.prep)]

    # -- views -------------------------------------------------------------------------------
    def _kernel(self) -> list[str]:
        """/proc (the machine's), /dev and /sys: kernel interfaces read-only."""
        return ["--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys",
                "--ro-bind-try", "/proc/sysrq-trigger", "/proc/sysrq-trigger",
                "--dev", "/dev", "--bind", str(self.layer / "dev_shm"), "/dev/shm",
                # /dev itself is a tmpfs of bwrap's: read-only, so writes go to the quota'd places
                "--remount-ro", "/dev", "--ro-bind", "/sys", "/sys"]

    def _var(self, root: str | None = None) -> list[str]:
        a = ["--dir", "/var"]
        for entry in sorted(os.listdir("/var")):
            p = Path("/var") / entry
            if entry in _VAR_RW:
                continue
            if p.is_symlink():
                if root is None or not os.path.lexists(f"{root}/var/{entry}"):
                    a += ["--symlink", os.readlink(p), f"/var/{entry}"]
            elif entry == "lib":
                a += ["--dir", "/var/lib"]
                for keep in _VAR_LIB:
                    if (p / keep).exists():
                        a += ["--ro-bind", str(p / keep), f"/var/lib/{keep}"]
            elif p.is_dir():
                a += ["--dir", f"/var/{entry}"]  # the host's data (backups, www, ...) is not the image's
        for v in _VAR_RW:
            a += ["--bind", str(self.layer / f"var_{v}"), f"/var/{v}"]
        return a

    def _state(self) -> str:
        """The layer as the worker reaches it (with root it is mounted in the machine's namespace)."""
        return f"/proc/{self.proc.pid}/root{self.layer}" if self.quota else str(self.layer)

    def _system(self, root: str | None = None) -> list[str]:
        """The image's system: the host's read-only top-level folders and /usr. With ``root``
        (the machine's root folder, where earlier views made them) links already there are kept."""
        a = []
        for entry in sorted(os.listdir("/")):
            p = Path("/") / entry
            if p.is_symlink():
                if root is None or not os.path.lexists(f"{root}/{entry}"):
                    a += ["--symlink", os.readlink(p), f"/{entry}"]
            elif entry in _RO_TOP and p.is_dir():
                a += ["--ro-bind", str(p), f"/{entry}"]
        a += ["--dir", "/usr"]
        for entry in sorted(os.listdir("/usr")):
            if entry == "local":
                continue
            p = Path("/usr") / entry
            if not p.is_symlink():
                a += ["--ro-bind", str(p), f"/usr/{entry}"]
            elif root is None or not os.path.lexists(f"{root}/usr/{entry}"):
                a += ["--symlink", os.readlink(p), f"/usr/{entry}"]
        return a

    def _machine_view(self, fresh: bool = False) -> list[str]:
        """The agent's machine: its writable root with the image's system in it (``fresh``: the
        first view, which makes the root folder's links and mount points)."""
        d = self.layer
        root = None if fresh else f"{self._state()}/rootfs"
        a = ["--bind", str(d / "rootfs"), "/", *self._system(root)]
        for entry in _EMPTY_TOP:
            a += ["--dir", f"/{entry}"]
        a += ["--bind", str(d / "usr_local"), "/usr/local", *self._var(root)]
        a += ["--bind", str(d / "etc"), "/etc", "--bind", str(d / "root"), "/root",
              "--bind", str(d / "home"), "/home", "--bind", str(d / "tmp"), "/tmp",
              "--bind", str(d / "run"), "/run", "--ro-bind", str(self.ctl), "/run/cycleqd", *self._kernel()]
        return a

    def _check_view(self, fds: list[int]) -> list[str]:
        """The machine as a check sees it: the image's system, loader and start-up files
        (never the agent's, wherever it put or moved them), the agent's files everywhere else.

        Folders where both meet (``/``, ``/usr``, ``/usr/local``, ``/etc``) are composed entry
        by entry from descriptors opened without following links, so nothing the agent
        renames or replaces while the view is built can bring a path of the host into it.
        """
        d = self.layer
        state = self._state()
        host_usr = set(os.listdir("/usr"))
        top_links = {e for e in os.listdir("/") if os.path.islink(f"/{e}")}
        a = self._system()
        a += self._compose(state, "rootfs", "", _MANAGED_TOP | top_links, fds)
        a += self._compose(state, "rootfs/usr", "/usr", host_usr | _IMAGE_ABSENT_USR, fds)
        a += ["--dir", "/usr/local"] + self._compose(state, "usr_local", "/usr/local", {"lib"}, fds)
        a += ["--dir", "/usr/local/lib"]  # the image's (empty): no .pth, sitecustomize or library of the agent's
        a += ["--dir", "/etc"] + self._compose(state, "etc", "/etc", set(), fds, skip=_image_etc)
        for name in sorted(os.listdir(self.image / "etc")):
            src = self.image / "etc" / name
            a += (["--symlink", os.readlink(src), f"/etc/{name}"] if src.is_symlink()
                  else ["--ro-bind", str(src), f"/etc/{name}"])
        a += self._var()
        a += ["--bind", str(d / "root"), "/root", "--bind", str(d / "home"), "/home",
              "--bind", str(d / "tmp"), "/tmp", "--bind", str(d / "run"), "/run", *self._kernel()]
        return a

    @staticmethod
    def _compose(state: str, rel: str, dst: str, names: set[str], fds: list[int], skip=None) -> list[str]:
        """Bind every entry of the layer's folder ``rel`` at ``dst`` except ``names``."""
        out: list[str] = []
        try:
            dfd = os.open(state, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return out
        try:
            for part in rel.split("/"):
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                os.close(dfd)
                dfd = nxt
            entries = sorted(os.listdir(dfd))
        except OSError:
            os.close(dfd)
            return out
        try:
            kept = 0
            for name in entries:
                if name in names or (skip is not None and skip(name)):
                    continue
                if kept >= _MAX_ENTRIES:
                    break
                try:
                    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                except OSError:
                    continue
                kept += 1
                if stat.S_ISLNK(os.fstat(fd).st_mode):
                    try:
                        out += ["--symlink", os.readlink(name, dir_fd=dfd), f"{dst}/{name}"]
                    except OSError:
                        pass
                    os.close(fd)
                    continue
                fds.append(fd)
                out += ["--bind", f"/proc/self/fd/{fd}", f"{dst}/{name}"]
        finally:
            os.close(dfd)
        return out

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
        args = self._machine_view() if view == "machine" else self._check_view(opened)
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
        argv, fds, opened = self._enter("machine", _CAPS, _ENV, "/root")
        try:
            self.shell = subprocess.Popen(
                [*argv, "/bin/bash", "-c", f"{_CLOSE_FDS}; exec /bin/bash --noprofile --norc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=self._child_setup(),
                env=dict(_ENV), cwd="/", pass_fds=fds)
        finally:
            for fd in opened:
                os.close(fd)
        self._buf = b""
        self._shell_pid = None
        setup = f"exec 2>&1; set +m; shopt -s expand_aliases; cd -- {shlex.quote(cwd)} 2>/dev/null"
        r = self._run(setup, 30, agent=False)
        if r.exit_code == -1:
            raise SandboxUnavailable(f"the OS machine's shell did not start: {r.output[-300:]}")
        for pid in sorted(_descendants(self.shell.pid)):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "bash":
                        self._shell_pid = pid
                        break
            except OSError:
                continue

    # -- processes of the machine ------------------------------------------------------------
    def _processes(self) -> set[tuple[int, int]]:
        """(pid, start time) of every process in the machine, wherever it was reparented."""
        out: set[tuple[int, int]] = set()
        pids = set(self.cgroup.pids())
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.readlink(f"/proc/{name}/ns/pid") == self._pidns:
                        pids.add(int(name))
                except OSError:
                    continue
        for pid in pids:
            st = _start_time(pid)
            if st is not None:
                out.add((pid, st))
        return out

    def _kill_since(self, before: set[tuple[int, int]], keep: set[int] = frozenset()) -> None:
        """Kill every process the machine gained since ``before`` (except ``keep``), the machine
        frozen meanwhile so that none forks past the kill.

        A new process is spared only while its parent chain leads to a process that was
        already running other than the shell and the machine's init: a child that an earlier
        background job starts now. Anything detached (``setsid``, double fork, reparented to
        init) cannot be told apart from the command's own and is killed.
        """
        frozen = self.cgroup.freeze(True)
        roots = {self._init_pid, self._shell_pid}
        try:
            self._kill_new(before, keep, roots)
        finally:
            if frozen:
                self.cgroup.freeze(False)
        for _ in range(50):
            if not self._kill_new(before, keep, roots):
                return
            time.sleep(0.02)

    def _kill_new(self, before: set[tuple[int, int]], keep: set[int], roots: set[int | None]) -> bool:
        procs = self._processes()
        old = {pid for pid, _ in procs & before}
        new = {pid for pid, _ in procs - before}
        killed = False
        for pid in new - set(keep):
            up, spared = pid, False
            for _ in range(64):
                up = _parent(up)
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
        if self.shell is not None:
            for pid in (self._shell_pid, self.shell.pid):
                try:
                    if pid:
                        os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                self.shell.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for f in (self.shell.stdin, self.shell.stdout):
                try:
                    f.close()
                except OSError:
                    pass
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
                    if timed_out:  # the shell itself is busy: replace it, files kept
                        out, self._buf = self._buf, b""
                        self._kill_since(before)
                        self._restart_shell()
                        return ShellOutput(out.decode("utf-8", errors="replace"), -1, True)
                    timed_out = True
                    self.timeouts += 1
                    self._kill_since(before, keep={self._shell_pid} if self._shell_pid else set())
                    deadline = time.monotonic() + 2.0
                    continue
                r, _, _ = select.select([fd], [], [], min(left, 0.5))
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
            proc = subprocess.Popen([*enter, "/bin/bash", "-c", f'{_CLOSE_FDS}; exec "$@"', "bash", *argv],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=dict(env), cwd="/", pass_fds=fds,
                                    preexec_fn=self._child_setup())
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
                ready, _, _ = select.select([fd], [], [], min(left, 0.05))
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
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
            proc.stdout.close()
        code = proc.wait()
        text = bytes(out).decode("utf-8", errors="replace")
        return ShellOutput(text, -1 if timed_out else code, timed_out)

    def close(self) -> None:
        """Kill everything in the episode and delete its layer."""
        for p in (self.shell, self.proc):
            if p is not None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
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


def _limit(memory_mb: int) -> None:
    mem = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 20, 256 << 20))
