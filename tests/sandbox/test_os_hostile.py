"""The OS task's machine against a hostile agent: the host's kernel settings and data are out of
reach, every process a command started ends at its time limit, checks run from the image's
view whatever the agent did to the loader, Python's start-up, PATH or its shell, and a killed
worker's leftovers are removed at the next start."""
from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from cycleqd.sandbox import bwrap_available, cgroups
from cycleqd.sandbox.os_env import OSSession
from cycleqd.tasks.os_interaction import OSProblem, judge

pytestmark = pytest.mark.skipif(not bwrap_available(), reason="bubblewrap (bwrap) missing or cannot start here")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def session() -> OSSession:
    s = OSSession(memory_mb=1024)
    yield s
    s.close()


def _host_sysctls() -> dict[str, bytes]:
    out = {}
    for folder, _, files in os.walk("/proc/sys"):
        for n in files:
            p = os.path.join(folder, n)
            try:
                if os.stat(p).st_mode & 0o222:
                    with open(p, "rb") as f:
                        out[p] = f.read()
            except OSError:
                continue
    return out


def test_no_kernel_setting_can_be_changed(session: OSSession) -> None:
    """Every sysctl that looks writable is written (its own value, and a new one for two harmless
    ones) from the agent's shell and from a check; none may take it, and the host's values stay."""
    before = _host_sysctls()
    burst = "/proc/sys/kernel/printk_ratelimit_burst"
    old_burst = Path(burst).read_text().strip()
    try:
        write_all = ("n=0; ok=0; for f in $(find /proc/sys -type f -perm /222 2>/dev/null); do n=$((n+1)); "
                     "v=$(cat $f 2>/dev/null) || continue; printf '%s\\n' \"$v\" > $f 2>/dev/null && ok=$((ok+1)) "
                     "&& echo TOOK $f; done; echo tried=$n took=$ok; "
                     f"echo {int(old_burst) + 7} > {burst}; echo '|/tmp/x' > /proc/sys/kernel/core_pattern; "
                     "echo 1 > /proc/sysrq-trigger; "
                     "find /proc/sys /sys /proc/sysrq-trigger -writable 2>/dev/null | head -5 | sed 's/^/WRITABLE /'")
        for out in (session.run(write_all, timeout=120).output,
                    session.run_script("bash", write_all, [], timeout=120).output):
            tried = int(out.split("tried=")[1].split()[0])
            assert tried > 50, out[-500:]  # the loop really ran over the kernel's settings
            assert "took=0" in out and "TOOK" not in out and "WRITABLE" not in out, out[-1500:]
        after = _host_sysctls()
        changed = [p for p, v in before.items() if after.get(p) != v and "random" not in p and "ns_last_pid" not in p
                   and "inotify" not in p and not p.endswith(("/stat", "/dentry-state", "/inode-state", "/file-nr"))]
        assert Path(burst).read_text().strip() == old_burst
        assert changed == [], changed
    finally:
        if Path(burst).read_text().strip() != old_burst:  # a hole: put the host back
            Path(burst).write_text(old_burst)
        for p, v in before.items():
            if p.endswith("core_pattern"):
                try:
                    if Path(p).read_bytes() != v:
                        Path(p).write_bytes(v)
                except OSError:
                    pass


def test_host_data_is_invisible(session: OSSession) -> None:
    """Host folders with data (/var/backups, /var/tmp, /opt, the project, the benchmark data,
    homes) are not there; a root-only host file in a folder the machine mounts read-only is
    unreadable, to the agent and to checks."""
    tag = "cq" + secrets.token_hex(6)
    made = [Path(f"/var/backups/{tag}.bak"), Path(f"/var/tmp/{tag}"), Path(f"/opt/{tag}"),
            Path(f"/usr/share/{tag}")]
    try:
        for p in made:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"secret {tag}\n")
            p.chmod(0o600)
        look = (f"cat /var/backups/* /var/tmp/* /opt/* /usr/share/{tag} 2>&1; "
                f"grep -rs {tag} /var /opt /srv /mnt /root /home /tmp /etc 2>/dev/null | head -3; "
                f"ls -d {REPO} /work /farm /old_root /root/.pyenv /container_info.json 2>&1; "
                f"ls -d /usr/share/{tag} 2>&1")
        for out in (session.run(look, timeout=60).output, session.run_script("bash", look, [], timeout=60).output):
            assert f"secret {tag}" not in out, out
            if session.sys_root == "/":  # the host's read-only /usr: there, not readable
                assert f"/usr/share/{tag}: Permission denied" in out
            else:  # the image's /usr: nothing of the host's is there
                assert f"cannot access '/usr/share/{tag}': No such file or directory" in out
            for path in (str(REPO), "/work", "/root/.pyenv"):
                assert f"cannot access '{path}'" in out, (path, out)
    finally:
        for p in made:
            p.unlink(missing_ok=True)


def _cpu_ticks(session: OSSession) -> int:
    total = 0
    for pid, _ in session._processes():
        try:
            fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total


def _busy(session: OSSession) -> bool:
    """Whether the machine's processes use CPU (over half a second)."""
    a = _cpu_ticks(session)
    time.sleep(0.5)
    return _cpu_ticks(session) - a > 10  # ticks are 1/100 s: more than a fifth of a core


@pytest.mark.parametrize("command", [
    "while :; do :; done",  # the shell's own loop
    "setsid -f sh -c 'while :; do :; done'; sleep 100",
    "nohup sh -c 'while :; do :; done' >/dev/null 2>&1 & disown; sleep 100",
    "( ( sh -c 'while :; do :; done' & ) & ); sleep 100",  # double fork
])
def test_everything_a_command_started_ends_at_its_time_limit(session: OSSession, command: str) -> None:
    """After the limit no process of the command runs (CPU of the machine's processes, counted on
    the host), earlier background jobs live on (with the children they start meanwhile), and the
    session works in the same folder."""
    session.run("cd /tmp && echo kept > f; sleep 311 & (while :; do sleep 0.2; done) &", timeout=10)
    t = time.monotonic()
    r = session.run(command, timeout=1.5)
    assert r.timed_out and time.monotonic() - t < 10
    assert not _busy(session)
    after = session.run("pwd; cat f; pgrep -f 'sleep 311' >/dev/null && echo bg-alive; sleep 0.5; "
                        "pgrep -f 'sleep 0.2' >/dev/null && echo loop-alive; echo ok", timeout=10)
    assert after.output.split() == ["/tmp", "kept", "bg-alive", "loop-alive", "ok"], after.output
    assert not _busy(session)


def test_a_checks_detached_processes_end_at_its_time_limit(session: OSSession) -> None:
    session.run("true", timeout=5)
    r = session.run_script("bash", "setsid -f sh -c 'while :; do :; done'; sleep 100", [], timeout=1.5)
    assert r.timed_out and not _busy(session)
    assert session.run("echo ok", timeout=5).output.strip() == "ok"


PRELOAD_C = "#include <unistd.h>\n__attribute__((constructor)) static void f(void) { _exit(0); }\n"


def test_checks_are_not_fooled_by_what_the_agent_planted(session: OSSession) -> None:
    """The agent plants every start-up hook it can reach; a check (python and bash, with
    python3, grep and awk called by name) still fails a wrong answer and passes the right one,
    and still sees the agent's real work (files in /root, /tmp, /etc, /usr/local/bin, /opt)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    work = ("echo 42 > /root/answer; mkdir -p /opt/app; echo 42 > /opt/app/v; useradd -m alice; "
            "printf '#!/bin/sh\\necho 42\\n' > /usr/local/bin/calc; chmod +x /usr/local/bin/calc")
    assert session.run(work + "; echo done", timeout=30).output.strip().endswith("done")
    plant = textwrap.dedent("""\
        for d in /usr/local/lib/python3.11/dist-packages /usr/local/lib/python3/dist-packages \
                 /root/.local/lib/python3.11/site-packages /usr/lib/python3/dist-packages; do
          mkdir -p $d && echo 'import os; os._exit(0)' > $d/zz.pth
          echo 'import os; os._exit(0)' > $d/sitecustomize.py; echo 'import os; os._exit(0)' > $d/usercustomize.py
        done
        echo 'import os; os._exit(0)' > /etc/python3.11/sitecustomize.py
        echo 'import os; os._exit(0)' > /root/sys.py; echo 'import os; os._exit(0)' > /root/json.py
        mkdir -p /tmp/fakepy; printf 'home = /tmp/fakepy\\n' > /usr/pyvenv.cfg
        for c in bash python3 python grep awk sh; do printf '#!/bin/sh\\nexit 0\\n' > /usr/local/bin/$c; chmod +x /usr/local/bin/$c; done
        printf '#!/bin/sh\\nexit 0\\n' > /tmp/fakeawk; chmod +x /tmp/fakeawk; ln -sf /tmp/fakeawk /etc/alternatives/awk
        echo 'exit() { builtin exit 0; }; alias python3=true; export PYTHONSTARTUP=/root/sys.py' | tee -a /root/.bashrc >> /etc/bash.bashrc
        echo 'export BASH_ENV=/root/.bashrc LD_PRELOAD=/tmp/x.so PYTHONPATH=/root' >> /etc/environment
        export BASH_ENV=/root/.bashrc LD_PRELOAD=/tmp/x.so PYTHONPATH=/root PYTHONSTARTUP=/root/sys.py
        echo 'passwd: files ../../../tmp/evil' >> /etc/nsswitch.conf
        echo planted
    """)
    assert "planted" in session.run(plant, timeout=30).output
    if gcc:  # built on the host (the image has no compiler), written into the machine
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "x.c").write_text(PRELOAD_C)
            subprocess.run([gcc, "-shared", "-fPIC", "-o", f"{tmp}/x.so", f"{tmp}/x.c"], check=True)
            lib = base64.b64encode((Path(tmp) / "x.so").read_bytes()).decode()
        r = session.run(f"echo {lib} | base64 -d > /tmp/x.so && echo /tmp/x.so > /etc/ld.so.preload; echo $?",
                        timeout=60)
        assert r.output.strip().endswith("0"), r.output
    # the agent replaces the machine's /bin (a link in its own root folder) last
    session.run("rm -f /bin && mkdir /bin && printf '#!/tmp/fakeawk\\n' > /bin/bash; chmod +x /bin/bash", timeout=10)

    py = ("python", ("import sys, json, pwd\nok = sys.argv[1].strip() == open('/root/answer').read().strip() "
                     "== open('/opt/app/v').read().strip()\npwd.getpwnam('alice')\nexit(0 if ok else 1)"))
    sh = ("bash", ('test "$(calc)" = "$1" && python3 -c "import sys; sys.exit(0 if \'$1\' == \'42\' else 1)" && '
                   'echo "$1" | grep -qx 42 && [ "$(echo "$1" | awk \'{print $1 * 2}\')" = 84 ] && '
                   'grep -q "^alice:" /etc/passwd && id alice >/dev/null'))
    for check in (py, sh):
        problem = OSProblem(id="0", description="d", check=(check,))
        assert not judge(problem, "41", session), check
        assert judge(problem, "42", session), check
        assert not judge(problem, "", session), check
    if not gcc:
        pytest.skip("no C compiler (gcc, cc) here: the /etc/ld.so.preload variant was not planted")


KILLED = """
import sys, time
from cycleqd.sandbox.os_env import OSSession
s = OSSession(memory_mb=512)
s.run("sleep 1000 &", timeout=5)
print(s.dir, s.proc.pid, flush=True)
time.sleep(1000)
"""


def test_a_killed_workers_episode_is_removed_at_the_next_start() -> None:
    """A worker SIGKILLed with a session open leaves its folder and cgroups; the next session
    started removes them, and nothing of that episode runs any more."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = proc.stdout.readline().split()
        assert line, "the worker did not open a session"
        folder, machine = Path(line[0]), int(line[1])
        groups = [b / folder.name for b in cgroups.bases().values() if (b / folder.name).is_dir()]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert folder.is_dir()  # left behind
    fresh = OSSession(memory_mb=512)
    try:
        assert not folder.exists()
        assert not any(g.exists() for g in groups)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and Path(f"/proc/{machine}").exists():
            time.sleep(0.05)
        assert not Path(f"/proc/{machine}").exists() or "Z" in Path(f"/proc/{machine}/stat").read_text().split(")")[1][:3]
        assert fresh.run("echo ok", timeout=5).output.strip() == "ok"
    finally:
        fresh.close()
    assert not fresh.dir.exists()
