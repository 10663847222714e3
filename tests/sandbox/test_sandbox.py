"""The sandbox runs programs, and contains hostile ones within their limits."""
from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest

from cycleqd.sandbox import (
    DockerBackend,
    SandboxUnavailable,
    SubprocessBackend,
    UnsafeBackend,
    bwrap_available,
    get_backend,
    run_python,
    run_python_batch,
    run_shell,
    run_shell_batch,
)

BACKENDS = [pytest.param("bwrap", marks=pytest.mark.skipif(
    not bwrap_available(), reason="bubblewrap (bwrap) missing or cannot start here"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_python_and_shell_basics(backend: str) -> None:
    r = run_python("import sys\nprint(sum(range(10)))\nprint('err', file=sys.stderr)\nsys.exit(3)",
                   backend=backend)
    assert (r.returncode, r.stdout, r.stderr.strip(), r.timed_out, r.error) == (3, "45\n", "err", False, None)
    r = run_python("print(open('data.txt').read())", files={"data.txt": "hello"}, backend=backend)
    assert r.stdout.strip() == "hello"
    r = run_shell("cat a/b.txt | tr a-z A-Z; cat made.txt", files={"a/b.txt": "abc\n"},
                  init="echo from-init > made.txt; echo hidden", backend=backend)
    assert r.stdout.split() == ["ABC", "from-init"]
    r = run_python("raise ValueError('boom')", backend=backend)
    assert r.returncode == 1 and "ValueError: boom" in r.stderr and r.error is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_are_independent_and_fast(backend: str) -> None:
    n = 200
    t = time.monotonic()
    rs = run_python_batch([f"import os\nopen('x', 'w').write('{i}')\nprint(len(os.listdir('.')), {i} * 2)"
                           for i in range(n)], backend=backend)
    took = time.monotonic() - t
    # Fresh folder per program: each sees exactly the one file it wrote.
    assert [r.stdout.split() for r in rs] == [["1", str(2 * i)] for i in range(n)]
    assert took < 6.0, f"{n} tiny programs took {took:.2f}s"
    jobs = [({"in.txt": f"{i}\n"}, "cat in.txt; ls | wc -l") for i in range(50)]
    rs = run_shell_batch(jobs, backend=backend)
    assert [r.stdout.split() for r in rs] == [[str(i), "1"] for i in range(50)]


HOSTILE = {
    "read_shadow": "print(open('/etc/shadow').read())",
    "write_outside": "open({path!r}, 'w').write('x')\nprint('wrote')",
    "socket": "import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=1)\nprint('connected')",
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "loop": "while True:\n    pass",
    "alloc_10gb": "x = bytearray(10 * 1024 ** 3)\nprint('allocated')",
    "escape_group": "import subprocess\nsubprocess.Popen(['setsid', 'sleep', '{tag}'])\nprint('started')",
}


def _leftovers(tag: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if f"sleep {tag}" in line]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_programs_fail_within_limits(backend: str, tmp_path) -> None:
    target = str(tmp_path / "pwned")
    tag = str(3000 + uuid.uuid4().int % 1000)
    progs = {k: v.format(path=target, tag=tag) for k, v in HOSTILE.items()}
    timeout = 1.5
    t = time.monotonic()
    rs = dict(zip(progs, run_python_batch(list(progs.values()), timeout=timeout, memory_mb=256, backend=backend)))
    took = time.monotonic() - t
    assert rs["read_shadow"].returncode != 0 and "root:" not in rs["read_shadow"].stdout
    assert rs["write_outside"].returncode != 0 and not os.path.exists(target)
    assert rs["socket"].returncode != 0 and "connected" not in rs["socket"].stdout
    for k in ("fork_bomb", "loop"):
        assert rs[k].timed_out and rs[k].error and rs[k].seconds < timeout + 1.0, (k, rs[k])
    assert rs["alloc_10gb"].returncode != 0 and "MemoryError" in rs["alloc_10gb"].stderr
    assert took < 3 * (timeout + 1.0) + 3.0
    # Nothing the jobs started survives the batch, not even a process that left its group.
    time.sleep(0.2)
    assert _leftovers(tag) == []
    # And the machine still works: a fresh program runs normally.
    assert run_python("print('alive')", backend=backend).stdout == "alive\n"


@pytest.mark.skipif(not bwrap_available(), reason="bubblewrap (bwrap) missing or cannot start here")
def test_bwrap_has_no_network_and_private_tmp() -> None:
    r = run_shell("cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '; touch /tmp/x 2>&1; "
                  "ls /root | wc -l", backend="bwrap")
    lines = r.stdout.split()
    assert lines[0] == "lo" and "eth0" not in lines
    assert not os.path.exists("/tmp/x") or os.path.getmtime("/tmp/x") < time.time() - 60


def test_subprocess_backend_is_refused_unless_explicitly_unsafe() -> None:
    """'subprocess' cannot hide the host from a job: selecting it is a configuration error
    (a ValueError the config layer turns into exit 2), and it exists only as an explicit opt-in."""
    with pytest.raises(UnsafeBackend, match="cannot contain") as e:
        get_backend("subprocess")
    assert isinstance(e.value, ValueError)
    with pytest.raises(UnsafeBackend):
        SubprocessBackend()
    assert isinstance(get_backend("subprocess", allow_unsafe=True), SubprocessBackend)


def test_shell_timeout_kills_the_whole_group() -> None:
    tag = str(4000 + uuid.uuid4().int % 1000)
    t = time.monotonic()
    r = run_shell(f"sleep {tag} & sleep {tag} & wait", timeout=1.0)
    assert r.timed_out and time.monotonic() - t < 5.0
    time.sleep(0.2)
    assert _leftovers(tag) == []


def test_docker_backend_is_selectable_with_a_clear_error() -> None:
    try:
        backend = DockerBackend()
    except SandboxUnavailable as e:
        assert "docker" in str(e).lower() and "engine" in str(e).lower()
        with pytest.raises(SandboxUnavailable):
            get_backend("docker")
    else:  # a Docker engine runs here: it must actually run a program
        assert backend.run_batch([{"kind": "python", "code": "print(7)"}], timeout=60, memory_mb=256)[0].stdout == "7\n"
    with pytest.raises(ValueError, match="unknown sandbox backend"):
        get_backend("podman")


def test_sandbox_works_when_the_project_lives_under_tmp(tmp_path):
    """The sandbox hides the host's /tmp, /root and /home: a checkout there must still run jobs."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import cycleqd

    shutil.copytree(Path(cycleqd.__file__).parent, tmp_path / "cycleqd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import cycleqd.sandbox as s; assert s.__file__.startswith(sys.argv[1]), s.__file__;"
        "r = s.run_python_batch(['print(6 * 7)'], timeout=5);"
        "print(r[0].stdout.strip(), r[0].returncode)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-800:]
    assert out.stdout.split() == ["42", "0"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_scratch_folders_are_private_and_have_a_quota(backend: str) -> None:
    tag = uuid.uuid4().hex[:12]
    names = [f"/tmp/cq-{tag}", f"/dev/shm/cq-{tag}", f"/var/tmp/cq-{tag}"]
    r = run_shell("; ".join(f"echo x > {n} 2>/dev/null" for n in names) + "; "
                  "for i in $(seq 1 150); do head -c 15M /dev/zero > f$i 2>/dev/null || break; done; "
                  "du -sm . | cut -f1", timeout=30, backend=backend)
    assert not any(os.path.exists(n) for n in names), "a job wrote the host's scratch folders"
    assert int(r.stdout.split()[-1]) <= 1100  # 2.2 GB asked, the 1 GB quota holds
