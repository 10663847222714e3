"""A throw-away Ubuntu-like machine for the OS-interaction task: one long-lived
root bash inside bubblewrap, plus fresh shells of the same machine.

The host's system folders (``/usr/*``, ``/bin``, ``/lib``, ...) are mounted
read-only; everything a task may change is a private writable layer for the
episode: ``/`` itself (new top-level folders), ``/etc`` (a copy of the host's
world-readable files, password hashes removed), ``/root`` (Ubuntu's skeleton
dot-files), ``/home``, ``/tmp``, ``/dev/shm``, ``/usr/local``, new files directly
in ``/usr``, ``/run`` and ``/var/{log,tmp,mail,spool,cache,local,opt}``.

Sealed from the worker (model commands are hostile input):

- environment: bubblewrap starts from a clean, minimal environment, so no process
  inside (its PID 1 included, ``/proc/*/environ``) holds anything of the worker's;
- files: the host's service data and homes are not there: of ``/var/lib`` only the
  package databases are shown, ``/opt``, ``/srv``, ``/mnt``, ``/media``, ``/boot``
  are empty, ``/root`` and ``/home`` are the episode's own;
- space: with root, the whole writable layer (``/dev/shm`` included) is one
  size-limited tmpfs in a mount namespace of the episode's own, so the quota
  covers every writable place together, and System V / POSIX IPC memory is capped;
- memory and processes: where the host allows it, the episode is one cgroup whose
  memory limit covers its processes, its files and anonymous shared memory
  (``memfd``) together, with a cap on the number of processes;
- no network, an own PID namespace (background processes live exactly as long as
  the episode), address-space and file-size limits on every process.

State (working folder, variables, background jobs) persists across commands: each
command is sourced into the same shell and followed by a sentinel line carrying
its exit status. A command that runs past its timeout has every process it started
killed; the shell itself survives. Capabilities are Docker's default set minus
``CAP_MKNOD`` (no device nodes), so ``useradd``/``chown`` work as in AgentBench's
containers.

:meth:`OSSession.run_script` is AgentBench's ``docker exec``: a new process in
the same machine (same files, processes, namespaces and capabilities) with the
container's environment (``HOME=/root``, Ubuntu's ``PATH``), not the agent's shell,
so nothing the agent did to its shell (variables, aliases, working folder,
``umask``, limits) reaches init scripts, examples or checks.
"""
from __future__ import annotations

import os
import re
import resource
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cycleqd.sandbox.backends import SandboxUnavailable, bwrap_available, private_tmpfs_works

_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
         "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_AUDIT_WRITE", "CAP_SETFCAP"]
_RO_TOP = {"bin", "sbin", "lib", "lib32", "lib64", "libx32"}
_EMPTY_TOP = ("opt", "srv", "media", "mnt", "boot")  # Ubuntu's image has them empty; hosts keep data there
_VAR_RW = ("log", "tmp", "mail", "spool", "cache", "local", "opt")
# Of /var/lib only what package tools read; everything else there is some service's data.
_VAR_LIB = ("dpkg", "apt", "ucf", "pam", "misc", "shells.state")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV = {"HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/bash", "TERM": "dumb",
        "LANG": "C.UTF-8", "PATH": _PATH}
# What `docker exec` gives a process in an Ubuntu container: the image's PATH, root's HOME.
_EXEC_ENV = {"PATH": _PATH, "HOME": "/root", "HOSTNAME": "ubuntu"}
# Harness scripts get one capability more than the agent (a harmless one): a process may
# only trace or read the memory of one whose capabilities are a subset of its own, so the
# agent's background processes cannot tamper with a running check.
_CAPS_SETPRIV = ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in _CAPS] + ["+ipc_lock"])
# Interpreters of scripts run by the harness (absolute: /usr/local is the agent's to change).
# (-I: no script folder, user site or PYTHON* variables on Python's path.)
_INTERPRETERS = {"bash": ["/bin/bash", "-c"], "python": ["/usr/bin/python3", "-I", "-c"]}
_IPC_LIMITS = {  # per IPC namespace: shared memory and message queues outside any file system
    "kernel/shmmax": 64 << 20, "kernel/shmall": (64 << 20) // 4096, "kernel/shmmni": 64,
    "kernel/msgmax": 8192, "kernel/msgmnb": 65536, "kernel/msgmni": 32,
    "fs/mqueue/queues_max": 16, "fs/mqueue/msg_max": 10, "fs/mqueue/msgsize_max": 8192,
}


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


def _own_cgroup(controller: str) -> Path | None:
    """This process's cgroup folder for ``controller`` (v1 hierarchy or the v2 unified one)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            return Path("/sys/fs/cgroup") / controller / path.lstrip("/")
    for line in lines:
        if line.startswith("0::") and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
    return None


def _make_cgroups(name: str, memory_mb: int, pids: int) -> list[Path]:
    """Best effort: memory and process-count cgroups for one episode (where the host lets us).

    Memory counts everything the episode's processes touch, files in its tmpfs and
    anonymous shared memory included, so the episode as a whole is capped, not only
    each process's address space.
    """
    made: list[Path] = []
    for controller, settings in (
        ("memory", {"memory.limit_in_bytes": memory_mb << 20, "memory.max": memory_mb << 20}),
        ("pids", {"pids.max": pids}),
    ):
        base = _own_cgroup(controller)
        if base is None or not base.is_dir():
            continue
        d = base / name
        try:
            d.mkdir(exist_ok=True)
        except OSError:
            continue
        wrote = False
        for key, value in settings.items():
            try:
                (d / key).write_text(str(value))
                wrote = True
            except OSError:
                pass
        if wrote and d not in made:
            made.append(d)
        elif not wrote:
            _remove_cgroups([d])
    return made


def _join_cgroups(dirs: list[Path]) -> None:
    """In a child before exec: move this process into ``dirs`` (its descendants follow)."""
    for d in dirs:
        try:
            with open(d / "cgroup.procs", "w") as f:
                f.write("0")
        except OSError:
            pass


def _remove_cgroups(dirs: list[Path]) -> None:
    for d in dirs:
        for _ in range(50):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)  # the last processes are still exiting


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


class OSSession:
    """A root bash in its own Ubuntu-like layer (see module docstring). Close it when done.

    Args:
        memory_mb: address-space limit for every process of the episode.
        disk_mb: quota of the whole writable layer (all writable places together).
        max_processes: processes the episode may have at once (where cgroups can be made).
        cwd: folder the shell starts in.
        launch: start the shell now; with False only the layer is built (slow part, safe in
            any thread) and :meth:`launch` must be called later, from a thread that outlives
            the session (bwrap dies with the thread that started it).

    Raises:
        SandboxUnavailable: bubblewrap is missing.
    """

    def __init__(self, *, memory_mb: int = 2048, disk_mb: int = 1024, max_processes: int = 1024,
                 cwd: str = "/root", launch: bool = True):
        if not bwrap_available():
            raise SandboxUnavailable("the OS task needs bubblewrap (apt-get install bubblewrap)")
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.dir = Path(tempfile.mkdtemp(prefix="cycleqd-os-", dir=shm))
        self.ctl = self.dir / "ctl"
        self.prep = self.dir / "prep"  # the layer's initial content
        # Where the layer lives while the shell runs: with root a tmpfs of disk_mb mounted
        # in the episode's own mount namespace (the host never sees it), else prep itself.
        self.quota = private_tmpfs_works()
        self.layer = self.dir / "layer" if self.quota else self.prep
        self.disk_mb, self.max_processes = int(disk_mb), int(max_processes)
        self.cgroups: list[Path] = []
        self.alive = False
        self.proc: subprocess.Popen | None = None
        self.memory_mb, self.cwd = memory_mb, cwd
        self._buf = b""
        self.timeouts = 0  # commands and checks killed at their time limit (load shows here)
        try:
            self._build_layer()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        if launch:
            self.launch()

    def launch(self) -> None:
        """Start the episode's shell (see ``launch`` in the class docstring)."""
        mem = self.memory_mb
        # Processes, their memory and the layer's files together (the layer is charged to it).
        self.cgroups = _make_cgroups(self.dir.name, self.memory_mb + self.disk_mb + 256, self.max_processes)
        groups = self.cgroups

        def child() -> None:
            _limit(mem)
            _join_cgroups(groups)

        try:
            # A clean environment from the first process on: bwrap's own (the sandbox's
            # PID 1) is readable from inside, so the worker's must never reach it.
            self.proc = subprocess.Popen(
                self._command(self.cwd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=child, env=dict(_ENV), cwd="/")
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.alive = True
        self.run("exec 2>&1; set +m; shopt -s expand_aliases", timeout=20)
        self._shell_pid = self._find_shell()
        # The machine's own init (bwrap's PID 1 inside): what fresh processes enter. Never the
        # agent's shell, which could chroot itself and hand checks a root of its making.
        inits = sorted(_children(self.proc.pid))
        self._init_pid = inits[0] if inits else None

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
        if self.quota:
            (self.dir / "layer").mkdir()
        self.ctl.mkdir(mode=0o700)

    def _wrapper(self) -> list[str]:
        """With root: a private mount and IPC namespace holding the layer's tmpfs, then bwrap."""
        if not self.quota:
            return []
        ipc = " && ".join(f"echo {v} > /proc/sys/{k}" for k, v in _IPC_LIMITS.items())
        script = (f'mount -t tmpfs -o size={self.disk_mb}m,mode=0755 cycleqd-layer "$1" && cp -a "$2"/. "$1"/ '
                  f"&& {{ {ipc}; }} 2>/dev/null; shift 2; exec \"$@\"")
        return [shutil.which("unshare") or "unshare", "--mount", "--ipc", "--propagation", "private",
                "/bin/sh", "-c", script, "sh", str(self.layer), str(self.prep)]

    def _command(self, cwd: str) -> list[str]:
        d = self.layer
        a = [*self._wrapper(), shutil.which("bwrap") or "bwrap", "--bind", str(d / "rootfs"), "/"]
        for entry in sorted(os.listdir("/")):
            p = Path("/") / entry
            if p.is_symlink():
                a += ["--symlink", os.readlink(p), f"/{entry}"]
            elif entry in _RO_TOP and p.is_dir():
                a += ["--ro-bind", str(p), f"/{entry}"]
        for entry in _EMPTY_TOP:
            a += ["--dir", f"/{entry}"]
        a += ["--dir", "/usr"]
        for entry in sorted(os.listdir("/usr")):
            if entry == "local":
                continue
            p = Path("/usr") / entry
            a += (["--symlink", os.readlink(p), f"/usr/{entry}"] if p.is_symlink()
                  else ["--ro-bind", str(p), f"/usr/{entry}"])
        a += ["--bind", str(d / "usr_local"), "/usr/local", "--dir", "/var"]
        for entry in sorted(os.listdir("/var")):
            p = Path("/var") / entry
            if entry in _VAR_RW:
                continue
            if p.is_symlink():
                a += ["--symlink", os.readlink(p), f"/var/{entry}"]
            elif entry == "lib":
                a += ["--dir", "/var/lib"]
                for keep in _VAR_LIB:
                    if (p / keep).exists():
                        a += ["--ro-bind", str(p / keep), f"/var/lib/{keep}"]
            else:
                a += ["--ro-bind", str(p), f"/var/{entry}"]
        for v in _VAR_RW:
            a += ["--bind", str(d / f"var_{v}"), f"/var/{v}"]
        a += ["--bind", str(d / "etc"), "/etc", "--bind", str(d / "root"), "/root",
              "--bind", str(d / "home"), "/home", "--bind", str(d / "tmp"), "/tmp",
              "--bind", str(d / "run"), "/run", "--ro-bind", str(self.ctl), "/run/cycleqd",
              "--proc", "/proc", "--dev", "/dev", "--bind", str(d / "dev_shm"), "/dev/shm",
              # /dev itself is a tmpfs of bwrap's: read-only, so writes go to the quota'd places
              "--remount-ro", "/dev", "--ro-bind", "/sys", "/sys",
              "--unshare-net", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try",
              *([] if self.quota else ["--unshare-ipc"]),
              "--hostname", "ubuntu", "--die-with-parent", "--new-session", "--chdir", cwd, "--clearenv"]
        for k, v in _ENV.items():
            a += ["--setenv", k, v]
        if os.geteuid() == 0:
            a += ["--cap-drop", "ALL"] + [x for c in _CAPS for x in ("--cap-add", c)]
        else:
            a += ["--unshare-user", "--uid", "0", "--gid", "0"]
        return a + ["/bin/bash", "--noprofile", "--norc"]

    def _find_shell(self) -> int:
        """Host PID of the session's bash (bwrap's child, or grandchild behind its PID-1 helper)."""
        todo = sorted(_descendants(self.proc.pid))
        for pid in todo:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "bash":
                        return pid
            except OSError:
                continue
        return self.proc.pid

    # -- commands ----------------------------------------------------------------------------
    def run(self, command: str, timeout: float = 10.0) -> ShellOutput:
        """Evaluate ``command`` in the session shell; output is stdout+stderr together.

        Past ``timeout`` seconds every process the command started is killed and
        ``timed_out`` is set; if the shell itself is gone (``exit``), ``exit_code`` is -1.
        """
        if not self.alive or self.proc is None or self.proc.poll() is not None:
            self.alive = False
            return ShellOutput("", -1, False)
        nonce = uuid.uuid4().hex
        (self.ctl / nonce).write_text(command + "\n")
        before = _descendants(getattr(self, "_shell_pid", self.proc.pid))
        script = (f'eval "$(< /run/cycleqd/{nonce})" </dev/null\n'
                  f"printf '\\n__CQ_DONE_{nonce}_%s\\n' \"$?\"\n")
        try:
            self.proc.stdin.write(script.encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.alive = False
            return ShellOutput("", -1, False)
        sentinel = re.compile(rb"\n__CQ_DONE_" + nonce.encode() + rb"_(\d+)\n")
        deadline = time.monotonic() + timeout
        timed_out = False
        fd = self.proc.stdout.fileno()
        while True:
            m = sentinel.search(self._buf)
            if m:
                out, self._buf = self._buf[:m.start()], self._buf[m.end():]
                (self.ctl / nonce).unlink(missing_ok=True)
                return ShellOutput(out.decode("utf-8", errors="replace"), int(m.group(1)), timed_out)
            left = deadline - time.monotonic()
            if left <= 0:
                if timed_out:  # the shell itself is stuck: give up on this session
                    self.alive = False
                    out, self._buf = self._buf, b""
                    return ShellOutput(out.decode("utf-8", errors="replace"), -1, True)
                timed_out = True
                self.timeouts += 1
                self._kill_new(before)
                deadline = time.monotonic() + 3.0
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

    def _kill_new(self, before: set[int]) -> None:
        """Kill every process the timed-out command started (repeatedly: forks race the kill)."""
        shell = getattr(self, "_shell_pid", self.proc.pid)
        for _ in range(20):
            new = _descendants(shell) - before
            if not new:
                return
            for pid in new:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.02)

    def run_script(self, language: str, script: str, params: list[str], timeout: float = 30.0) -> ShellOutput:
        """Run a script as a new process of this machine (AgentBench's ``execute_independent``).

        Like ``docker exec``: the same files, processes and namespaces as the agent's
        shell, the container's environment and root's home as working folder, with the
        episode's capabilities and limits; ``bash`` scripts get ``params`` after ``--``,
        ``python`` scripts as arguments. Output is stdout and stderr together.

        Raises:
            ValueError: a language other than bash or python.
        """
        if language not in _INTERPRETERS:
            raise ValueError(f"unsupported script language {language!r}")
        argv = [*_INTERPRETERS[language], script, *(["--"] if language == "bash" else []), *map(str, params)]
        target = getattr(self, "_init_pid", None)
        if not self.alive or self.proc is None or self.proc.poll() is not None or target is None:
            return ShellOutput("", -1, False)
        enter = [shutil.which("nsenter") or "nsenter", "--target", str(target), "--all", "--root"]
        if os.geteuid() == 0:
            enter += ["--", shutil.which("setpriv") or "/usr/bin/setpriv", "--no-new-privs",
                      "--bounding-set", _CAPS_SETPRIV, "--inh-caps", "-all"]
        enter += ["--", "/usr/bin/env", "--chdir=/root"]
        mem, groups = self.memory_mb, self.cgroups

        def child() -> None:
            _limit(mem)
            _join_cgroups(groups)

        try:
            proc = subprocess.Popen([*enter, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True, env=dict(_EXEC_ENV),
                                    cwd="/", preexec_fn=child)
        except OSError as e:
            return ShellOutput(f"could not start a process in the machine: {e}", -1, False)
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
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except Exception:
                pass
        self.alive = False
        _remove_cgroups(self.cgroups)
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
