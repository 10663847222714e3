"""The OS task's machine is sealed: no worker secret by any path, a quota on every writable
place, no host service data, and fresh shells that share the machine but not the agent's shell."""
from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from cycleqd.sandbox import bwrap_available, run_shell
from cycleqd.sandbox.os_env import OSSession, read_pending

pytestmark = pytest.mark.skipif(not bwrap_available(), reason="bubblewrap (bwrap) missing or cannot start here")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """A secret in the worker's environment, as a user's Hub and cloud tokens are."""
    value = "cq" + secrets.token_hex(12)
    for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "CQ_TEST_SECRET"):
        monkeypatch.setenv(name, value)
    return value


@pytest.fixture
def session() -> OSSession:
    s = OSSession(memory_mb=1024)
    yield s
    s.close()


# Prints every place a process could find the worker's environment, without naming the secret.
LOOK = r"""
for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline /proc/self/environ /proc/thread-self/environ; do
  echo "== $f"; tr '\0' '\n' < "$f"; echo
done 2>&1
env; set; cat /proc/1/environ 2>&1
grep -rIl --exclude-dir=cycleqd "$(printf %s "$1")" /etc /root /home /tmp /run /var /usr/local /dev/shm 2>/dev/null | head
echo done
"""


def test_no_process_inside_sees_the_workers_environment(secret: str, session: OSSession) -> None:
    """The session starts after the secret is set (fixture order)."""
    # the pattern is passed split, so the command itself never holds the secret
    half = len(secret) // 2
    looker = LOOK.replace('"$(printf %s "$1")"', f'"$(printf %s%s {secret[:half]} {secret[half:]})"')
    session.run("sleep 300 &", timeout=5)  # a background process of the agent's
    out = session.run(looker, timeout=30).output
    assert "== /proc/1/environ" in out and out.rstrip().endswith("done")
    assert secret not in out
    fresh = session.run_script("bash", looker, [], timeout=30)
    assert fresh.exit_code == 0 and "== /proc/1/environ" in fresh.output
    assert secret not in fresh.output
    py = session.run_script("python", "import os\nfor p in os.listdir('/proc'):\n    try: print(open(f'/proc/{p}/environ','rb').read())\n    except OSError: pass", [])
    assert py.exit_code == 0 and "HOME=/root" in py.output and secret not in py.output


def test_code_sandbox_jobs_do_not_see_it_either(secret: str) -> None:
    """The code sandbox (bwrap; the uncontained subprocess backend is refused) hides the worker's secret too."""
    half = len(secret) // 2
    r = run_shell(LOOK.replace('"$(printf %s "$1")"', f'"$(printf %s%s {secret[:half]} {secret[half:]})"'),
                  timeout=20, backend="bwrap")
    assert "done" in r.stdout
    assert secret not in r.stdout and secret not in r.stderr


def test_every_writable_place_shares_one_quota(session: OSSession) -> None:
    t = time.monotonic()
    r = session.run("for i in $(seq 1 25); do head -c 200M /dev/zero > /dev/shm/f$i || break; done 2>&1; "
                    "du -sm /dev/shm | cut -f1", timeout=60)
    took = time.monotonic() - t
    written = int(r.output.split()[-1])
    assert written <= 1100 and "No space left" in r.output, r.output[-300:]  # 5 GB asked, about 1 GB got
    assert took < 30
    for place in ("/tmp", "/root", "/home", "/etc", "/usr/local", "/var/tmp", "/", "/run", "/var/log"):
        w = session.run(f"head -c 8M /dev/zero > {place.rstrip('/')}/fill 2>&1; echo rc=$?", timeout=20)
        assert "rc=0" not in w.output, (place, w.output)
    assert session.run("rm -f /dev/shm/f*; head -c 8M /dev/zero > /tmp/ok && echo fine", timeout=20).output.strip() == "fine"
    # the tmpfs of /dev itself is read-only; device nodes still work
    r = session.run("touch /dev/cq 2>&1; echo x > /dev/null && echo null-ok", timeout=10)
    assert "Read-only" in r.output and "null-ok" in r.output


def test_ipc_memory_is_capped(session: OSSession) -> None:
    code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.shmget(0, ctypes.c_size_t(1 << 30), 0o1600))\n"
            "print(libc.shmget(0, ctypes.c_size_t(1 << 20), 0o1600) >= 0)")
    r = session.run_script("python", code, [])
    assert r.output.split() == ["-1", "True"], r.output


def test_host_service_data_and_homes_are_hidden(session: OSSession) -> None:
    probes = {
        "/var/lib/mysql": "test -e /var/lib/mysql",
        "/var/lib/postgresql": "test -e /var/lib/postgresql",
        "project": f"test -e {REPO}",
        "/work": "test -e /work",
        "host home": "ls -A /home | grep -q .",
        "host root": "ls -A /root | grep -qv '^\\.bashrc$\\|^\\.profile$'",
        "/opt": "ls -A /opt | grep -q .",
        "/mnt": "ls -A /mnt | grep -q .",
        "password hashes": "cut -d: -f2 /etc/shadow | grep -q '^\\$'",
        "root-only config": "find /etc -type f ! -perm -o=r ! -name shadow ! -name gshadow | grep -q .",
        "mysql credentials": "test -e /etc/mysql/debian.cnf",
    }
    for what, probe in probes.items():
        r = session.run(f"{probe} && echo VISIBLE || echo hidden", timeout=20)
        assert r.output.strip() == "hidden", what
    # what the tasks use is still there
    r = session.run("dpkg -l | grep -c '^ii'; getent passwd root | cut -d: -f1; python3 -c 'print(7)'", timeout=20)
    lines = r.output.split()
    assert int(lines[0]) > 10 and lines[1:] == ["root", "7"]


def test_fresh_shells_share_the_machine_not_the_agents_shell(session: OSSession) -> None:
    session.run("cd /tmp && X=agent && export Y=agent && umask 077 && alias ls=false && ulimit -n 64 && "
                "f() { echo hijacked; } && echo made > /root/made && sleep 311 &", timeout=10)
    session.run("cd /tmp; export Y=agent; umask 077; ulimit -n 64; alias ls=false", timeout=10)
    r = session.run_script("bash", 'pwd; echo "X=$X Y=$Y"; umask; ulimit -n; type f 2>&1 | head -1; '
                           'cat /root/made; pgrep -f "sleep 311" >/dev/null && echo bg-visible; '
                           'grep CapEff /proc/self/status; echo "$@"', ["one", "two words"])
    out = r.output.splitlines()
    assert out[0] == "/root" and out[1] == "X= Y=" and out[2] == "0022" and out[3] != "64"
    assert "not found" in out[4] and out[5] == "made" and out[6] == "bg-visible"
    agent_caps = session.run("grep CapEff /proc/self/status", timeout=10).output.split()[-1]
    # the agent's capabilities plus CAP_IPC_LOCK, which keeps the agent from tracing a check
    assert int(out[7].split()[-1], 16) == int(agent_caps, 16) | 1 << 14 and out[8] == "one two words"
    env = session.run_script("bash", "env | cut -d= -f1 | sort | tr '\\n' ' '", []).output.split()
    # (a check's Pythons take no user site-packages and no script folder: the agent's files)
    assert set(env) <= {"HOME", "PATH", "HOSTNAME", "PWD", "SHLVL", "_", "PYTHONNOUSERSITE", "PYTHONSAFEPATH"}


def test_fresh_shell_limits_and_timeouts(session: OSSession) -> None:
    t = time.monotonic()
    r = session.run_script("bash", "sleep 100", [], timeout=1.5)
    assert r.timed_out and r.exit_code == -1 and time.monotonic() - t < 5
    r = session.run_script("python", "x = bytearray(4 << 30)\nprint('allocated')", [])
    assert r.exit_code != 0 and "MemoryError" in r.output
    r = session.run_script("bash", "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '", [])
    assert r.output.split() == ["lo"]
    # a script that leaves a daemon holding its output returns when the script itself ends
    t = time.monotonic()
    r = session.run_script("bash", "(sleep 60 &) ; echo started", [], timeout=20)
    assert r.output.strip() == "started" and r.exit_code == 0 and time.monotonic() - t < 5
    with pytest.raises(ValueError):
        session.run_script("ruby", "puts 1", [])


def test_planted_interpreters_do_not_fool_the_checks(session: OSSession) -> None:
    """The agent can write /usr/local/bin (first on PATH); the harness's interpreters are not there."""
    from cycleqd.tasks.os_interaction import OSProblem, judge

    session.run("printf '#!/bin/sh\\nexit 0\\n' > /usr/local/bin/python3; chmod +x /usr/local/bin/python3; "
                "cp /usr/local/bin/python3 /usr/local/bin/bash; hash -r", timeout=10)
    check = ("python", "import sys\nsys.exit(0 if sys.argv[1].strip() == '42' else 1)")
    problem = OSProblem(id="0", description="d", check=(check,))
    assert judge(problem, "42", session) and not judge(problem, "41", session)
    assert os.path.exists("/usr/bin/python3")


def test_episode_memory_and_processes_are_capped_as_a_whole() -> None:
    """Anonymous shared memory (memfd) is in no file system: only the episode's cgroup bounds it."""
    session = OSSession(memory_mb=512, disk_mb=256, max_processes=64)
    try:
        if "memory" not in session.cgroup.dirs:
            pytest.skip("this host lets no process create cgroups")
        code = ("import os\nfds = []\nfor i in range(40):\n    fd = os.memfd_create('x')\n"
                "    os.write(fd, bytes(100 << 20))\n    fds.append(fd)\nprint('survived 4 GB')")
        t = time.monotonic()
        r = session.run_script("python", code, [], timeout=60)
        assert r.exit_code != 0 and "survived" not in r.output and time.monotonic() - t < 30
        flood = ("import os, time\nn = 0\ntry:\n    while n < 500:\n        if os.fork() == 0:\n"
                 "            time.sleep(30)\n            os._exit(0)\n        n += 1\n"
                 "except OSError:\n    print('refused after', n)")
        r = session.run_script("python", flood, [], timeout=60)
        assert r.output.startswith("refused after") and int(r.output.split()[-1]) < 64
        assert session.run("echo alive", timeout=10).output.strip() == "alive"
    finally:
        session.close()
    assert session.cgroup.dirs and not any(d.exists() for d in session.cgroup.dirs.values())


def test_an_agent_in_a_root_of_its_own_does_not_move_the_checks(session: OSSession) -> None:
    """The agent's shell may chroot itself (as in Docker); checks still run in the machine's root."""
    from cycleqd.tasks.os_interaction import OSProblem, judge

    build = ("mkdir -p /tmp/fake/bin /tmp/fake/usr/bin && cp /bin/bash /tmp/fake/bin/ && "
             "for l in $(ldd /bin/bash | grep -o '/[^ ]*'); do mkdir -p /tmp/fake$(dirname $l); cp $l /tmp/fake$l; done && "
             "printf '#!/bin/bash\\nexit 0\\n' > /tmp/fake/usr/bin/python3 && chmod +x /tmp/fake/usr/bin/python3 && "
             "ln -s python3 /tmp/fake/usr/bin/python && echo built")
    assert session.run(build, timeout=30).output.strip().endswith("built")
    # 0<&10: the shell's saved stdin, so the chrooted shell keeps reading the session's pipe
    session.run("exec chroot /tmp/fake /bin/bash 0<&10", timeout=10)
    assert os.readlink(f"/proc/{session._shell_pid}/root").endswith("/tmp/fake")
    check = ("python", "import sys\nsys.exit(0 if sys.argv[1].strip() == '42' else 1)")
    problem = OSProblem(id="0", description="d", check=(check,))
    assert not judge(problem, "41", session) and judge(problem, "42", session)


def test_fresh_shell_output_written_just_before_it_exits_is_kept(session: OSSession) -> None:
    """The last write and the exit can fall between the reader's wait and its exit check; the
    output still in the pipe then is part of the result (a check that lost it failed answers
    that were right). Delays around the reader's 50 ms wait put the exit in that window."""
    lost = []
    for k in range(60):
        delay = 0.040 + (k % 21) * 0.001
        r = session.run_script("bash", f"sleep {delay:.3f}; printf '%s\\n' 3", [], timeout=10)
        if r.output != "3\n" or r.exit_code != 0:
            lost.append((delay, r.output, r.exit_code))
    assert lost == []


def test_output_left_in_the_pipe_of_an_exited_process_is_read_without_waiting() -> None:
    import subprocess

    proc = subprocess.Popen(["sh", "-c", "printf 3; (sleep 30 &)"], stdout=subprocess.PIPE)
    proc.wait()  # exited; its output unread, a background process still holds the pipe open
    out = bytearray()
    t = time.monotonic()
    read_pending(proc.stdout.fileno(), out, 1 << 20)
    assert bytes(out) == b"3" and time.monotonic() - t < 1
    capped = bytearray()
    proc = subprocess.Popen(["sh", "-c", "printf 12345"], stdout=subprocess.PIPE)
    proc.wait()
    read_pending(proc.stdout.fileno(), capped, 2)
    assert bytes(capped) == b"12"
