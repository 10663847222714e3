"""A throw-away Ubuntu-like machine for the OS-interaction task: one long-lived
root bash inside bubblewrap.

The host's system folders (``/usr/*``, ``/bin``, ``/lib``, ...) are mounted
read-only; everything a task may change is a private writable layer kept in a
temp folder for the episode: ``/`` itself (new top-level folders), ``/etc`` (a
copy with password hashes removed), ``/root``, ``/home``, ``/tmp``,
``/usr/local``, new files directly in ``/usr``, and ``/var/{log,tmp,mail,spool}``.
There is no network and the episode has its own PID namespace, so background
processes it starts live exactly as long as the episode.

State (working folder, variables, background jobs) persists across commands: each
command is sourced into the same shell and followed by a sentinel line carrying
its exit status. A command that runs past its timeout has every process it started
killed; the shell itself survives. Capabilities are Docker's default set minus
``CAP_MKNOD`` (no device nodes), so ``useradd``/``chown`` work as in AgentBench's
containers.
"""
from __future__ import annotations

import os
import re
import resource
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cycleqd.sandbox.backends import SandboxUnavailable, bwrap_available

_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
         "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_AUDIT_WRITE", "CAP_SETFCAP"]
_RO_TOP = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "opt", "srv", "media", "mnt", "boot"}
_VAR_RW = ("log", "tmp", "mail", "spool", "cache", "local", "opt")
_ENV = {"HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/bash", "TERM": "dumb",
        "LANG": "C.UTF-8", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


@dataclass(frozen=True)
class ShellOutput:
    """Output (stdout and stderr together) and exit status of one command in the session."""

    output: str
    exit_code: int
    timed_out: bool


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


class OSSession:
    """A root bash in its own Ubuntu-like layer (see module docstring). Close it when done.

    Args:
        memory_mb: address-space limit for every process of the episode.
        cwd: folder the shell starts in.
        launch: start the shell now; with False only the layer is built (slow part, safe in
            any thread) and :meth:`launch` must be called later, from a thread that outlives
            the session (bwrap dies with the thread that started it).

    Raises:
        SandboxUnavailable: bubblewrap is missing.
    """

    def __init__(self, *, memory_mb: int = 2048, cwd: str = "/root", launch: bool = True):
        if not bwrap_available():
            raise SandboxUnavailable("the OS task needs bubblewrap (apt-get install bubblewrap)")
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.dir = Path(tempfile.mkdtemp(prefix="cycleqd-os-", dir=shm))
        self.ctl = self.dir / "ctl"
        self.alive = False
        self.proc: subprocess.Popen | None = None
        self.memory_mb, self.cwd = memory_mb, cwd
        self._buf = b""
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
        try:
            self.proc = subprocess.Popen(
                self._command(self.cwd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=lambda: _limit(mem))
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.alive = True
        self.run("exec 2>&1; set +m; shopt -s expand_aliases", timeout=20)
        self._shell_pid = self._find_shell()

    # -- layer -------------------------------------------------------------------------------
    def _build_layer(self) -> None:
        d = self.dir
        (d / "rootfs").mkdir()
        shutil.copytree("/etc", d / "etc", symlinks=True, ignore_dangling_symlinks=True,
                        ignore=shutil.ignore_patterns("shadow-", "gshadow-", "ssh", "ssl"))
        _scrub_passwords(d / "etc" / "shadow")
        _scrub_passwords(d / "etc" / "gshadow")
        for sub in ("root", "home", "tmp", "usr_local", "run", *(f"var_{v}" for v in _VAR_RW)):
            (d / sub).mkdir()
        (d / "root").chmod(0o700)
        for sub in ("tmp", "var_tmp"):
            (d / sub).chmod(0o1777)
        for sub in ("bin", "sbin", "lib", "share", "include", "src", "etc"):
            (d / "usr_local" / sub).mkdir()
        self.ctl.mkdir(mode=0o700)

    def _command(self, cwd: str) -> list[str]:
        d = self.dir
        a = ["bwrap", "--bind", str(d / "rootfs"), "/"]
        for entry in sorted(os.listdir("/")):
            p = Path("/") / entry
            if p.is_symlink():
                a += ["--symlink", os.readlink(p), f"/{entry}"]
            elif entry in _RO_TOP and p.is_dir():
                a += ["--ro-bind", str(p), f"/{entry}"]
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
            a += (["--symlink", os.readlink(p), f"/var/{entry}"] if p.is_symlink()
                  else ["--ro-bind", str(p), f"/var/{entry}"])
        for v in _VAR_RW:
            a += ["--bind", str(d / f"var_{v}"), f"/var/{v}"]
        a += ["--bind", str(d / "etc"), "/etc", "--bind", str(d / "root"), "/root",
              "--bind", str(d / "home"), "/home", "--bind", str(d / "tmp"), "/tmp",
              "--bind", str(d / "run"), "/run", "--ro-bind", str(self.ctl), "/run/cycleqd",
              "--proc", "/proc", "--dev", "/dev", "--ro-bind", "/sys", "/sys",
              "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
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
        """Run a script as its own process (AgentBench's ``execute_independent``) with arguments."""
        name = uuid.uuid4().hex
        (self.ctl / name).write_text(script)
        args = " ".join(shlex.quote(p) for p in params)
        if language == "bash":
            cmd = f'bash -c "$(cat /run/cycleqd/{name})" -- {args}'
        elif language == "python":
            cmd = f'python3 -c "$(cat /run/cycleqd/{name})" {args}'
        else:
            raise ValueError(f"unsupported script language {language!r}")
        try:
            return self.run(f"( cd /root && {cmd} )", timeout=timeout)
        finally:
            (self.ctl / name).unlink(missing_ok=True)

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
