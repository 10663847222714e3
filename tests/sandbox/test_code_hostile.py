"""The code sandbox holds a job to its own memory, descriptors and files, and shows it no host data."""
from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import pytest

import cycleqd
from cycleqd.sandbox import bwrap_available, cgroups, run_python_batch
from cycleqd.sandbox.backends import CGROUP_PREFIX
from cycleqd.sandbox.verdict import CallJob, evaluate_calls_batch

pytestmark = pytest.mark.skipif(not bwrap_available(), reason="bubblewrap (bwrap) missing or cannot start here")


def _cgroups_work() -> bool:
    g = cgroups.make_group("cycleqd-probe", memory_mb=64)
    if g is None:
        return False
    g.remove()
    return True


def _memfd_holders(tag: str) -> list[str]:
    """Every descriptor or mapping, in any process on the host, of a memfd whose name holds ``tag``.

    A memfd's pages live exactly as long as one of these does, so none left means the host holds
    none of its memory. (A count of the host's shared memory would also see other tests' engines.)"""
    held = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if tag in os.readlink(fd):
                    held.append(str(fd))
            held += [f"{proc}/maps: {line}" for line in (proc / "maps").read_text().splitlines() if tag in line]
        except OSError:                    # the process ended while we looked
            continue
    return held


MEMFD_1GB = """
import os
chunk = b"x" * (1 << 20)
held = []
for k in range(128):                       # 128 memfds of 8 MB: RLIMIT_FSIZE binds one file only
    fd = os.memfd_create("TAG")
    os.ftruncate(fd, 8 << 20)
    for _ in range(8):
        os.write(fd, chunk)                # real pages, not holes
    held.append(fd)
print("held 1 GB")
"""


@pytest.mark.skipif(not _cgroups_work(), reason="no memory cgroup can be made here (not root, or no writable "
                                                "cgroup v1 memory / delegated v2 hierarchy)")
def test_a_1gb_memfd_is_stopped_at_the_jobs_memory_limit() -> None:
    """1 GB of memfd pages (which RLIMIT_AS does not count) at memory_mb=256: the job is killed as
    out of memory, its neighbour in the batch runs, and the host holds none of it afterwards."""
    tag = f"hog-{uuid.uuid4().hex}"
    mine = os.memfd_create(tag)                                   # the scan sees a memfd that is held
    try:
        assert _memfd_holders(tag), "the scan for memfd holders sees nothing"
    finally:
        os.close(mine)
    hog, ok = run_python_batch([MEMFD_1GB.replace("TAG", tag), "print('fine')"], timeout=20, memory_mb=256)
    assert "held 1 GB" not in hog.stdout
    assert hog.error and "out of memory" in hog.error and "256" in hog.error, hog
    assert ok.stdout == "fine\n" and ok.finished
    assert not _memfd_holders(tag), "shared memory of the job outlived it"
    base = cgroups.own_cgroup("memory")
    assert base is not None and not [p for p in base.glob(f"{CGROUP_PREFIX}-{os.getpid()}-*")], "cgroup left behind"


def test_a_job_cannot_write_another_jobs_output() -> None:
    """Job 0 (output) and job 2 (result descriptor) are running while job 1 writes to every
    descriptor number, its own /proc/self/fd and the /proc/<pid>/fd of every process it can see:
    job 0's output and job 2's values stay their own."""
    slow = "import time\ntime.sleep(1.5)\nprint('job0 own output')"
    attack = """
import os, glob
forged = b'{"r": [["ok", ["i", "2a"], 0.0]]}' + b"PWNED" * 100
me = str(os.getpid())
foreign = []
for fd in range(3, 1025):
    try:
        os.pwrite(fd, forged, 0)
        foreign.append(fd)
    except OSError:
        try:
            os.write(fd, forged)
            foreign.append(fd)
        except OSError:
            pass
for path in glob.glob("/proc/*/fd/*") + ["/proc/%d/fd/1" % os.getppid(), "/proc/%d/fd/3" % os.getppid()]:
    if path.split("/")[2] in (me, "self", "thread-self"):
        continue
    try:
        with open(path, "r+b") as f:
            f.write(forged)
        foreign.append(path)
    except OSError:
        pass
print("foreign", foreign)
"""
    victim = CallJob("import time\ndef f():\n    time.sleep(1.5)\n    return 7\n", ("f()",))
    from cycleqd.sandbox import get_backend

    specs = [{"kind": "python", "code": slow}, {"kind": "python", "code": attack},
             {"kind": "calls", "code": victim.program, "calls": list(victim.calls), "setup": "",
              "inputs": ["l"]}, {"kind": "python", "code": attack}]
    runs = get_backend("bwrap").run_batch(specs, timeout=10, memory_mb=256)
    assert runs[0].stdout == "job0 own output\n", runs[0]
    assert "PWNED" not in runs[2].stdout + runs[2].stderr
    assert json.loads(runs[2].result)["r"][0][:2] == ["ok", ["i", "7"]], runs[2].result
    for r in (runs[1], runs[3]):
        assert r.stdout == "foreign []\n", r  # no descriptor >= 3, no other process's descriptor
    # and the job's values are the job's own, whatever the neighbours wrote
    assert evaluate_calls_batch([victim], timeout=10, memory_mb=256)[0].outcomes[0].value == 7


HOST_DATA = ["/work", "/var/backups", "/opt", "/root", "/home", "/srv", "/mnt", "/media", "/var/lib",
             "/var/log", "/var/mail", "/run/lock", "/boot", "/sys/fs/cgroup"]


def test_host_data_is_invisible_to_a_job(tmp_path) -> None:
    """The project folder, the benchmark data (reference solutions), /var/backups, /opt, homes and
    the host's scratch folders are not readable from a job, and nothing it writes reaches the host."""
    project = str(Path(cycleqd.__file__).resolve().parents[1])
    tag = uuid.uuid4().hex[:10]
    host_var_tmp = Path("/var/tmp") / f"cq-host-{tag}"
    host_var_tmp.write_text("host secret")
    paths = [project, os.path.join(project, "cycleqd", "sandbox", "verdict.py"),
             "/work/shared/data/mbpp/mbpp.jsonl", str(host_var_tmp), str(tmp_path), *HOST_DATA]
    probe = f"""
import os
seen = []
for p in {paths!r}:
    try:
        if os.path.isdir(p):
            if os.listdir(p):
                seen.append((p, sorted(os.listdir(p))))
        else:
            open(p, "rb").read(1)
            seen.append(p)
    except OSError:
        pass
for p in ["/run/lock/cq-{tag}", "/dev/shm/cq-{tag}", "/var/tmp/cq-{tag}", "/tmp/cq-{tag}", "/cq-{tag}",
          "/etc/cq-{tag}", "/usr/cq-{tag}"]:
    try:
        open(p, "w").write("x")
    except OSError:
        pass
print("seen", seen)
"""
    try:
        r = run_python_batch([probe], timeout=10, memory_mb=256)[0]
    finally:
        host_var_tmp.unlink()
    assert r.stdout.startswith("seen"), r
    seen = eval(r.stdout[5:])  # noqa: S307 - the probe prints a list literal
    # The interpreter comes back read-only where it lives under a hidden folder (pyenv under
    # /root): the folders on its way show that one entry, nothing else.
    way = {str(Path(*Path(d).parts[:k])) for d in (os.path.dirname(os.path.realpath(sys.executable)),
                                                   os.path.realpath(sys.base_prefix))
           for k in range(2, len(Path(d).parts) + 1)}
    for item in seen:
        assert isinstance(item, tuple), f"a job read {item}"
        folder, entries = item
        assert all(os.path.join(folder, e) in way for e in entries), f"a job listed {folder}: {entries}"
    for p in ["/run/lock", "/dev/shm", "/var/tmp", "/tmp", "/", "/etc", "/usr"]:
        assert not os.path.exists(f"{p}/cq-{tag}"), f"a job wrote the host's {p}"


def test_scratch_is_private_per_job_and_a_filler_cannot_starve_a_gold_run() -> None:
    """Each job has its own /tmp, /dev/shm and /var/tmp: a job never sees another's files, and jobs
    that fill theirs leave a later job in the same batch all of its own space."""
    fill = ("import os\nfor d in ('/tmp', '/dev/shm', '/var/tmp'):\n"
            "    try:\n        for k in range(1000):\n"
            "            with open(f'{d}/fill{k}', 'wb') as f:\n"
            "                f.write(b'x' * (8 << 20))\n"
            "    except OSError:\n        pass\nprint('filled')")
    gold = ("import os\nprint(sorted(os.listdir('/tmp')), os.listdir('/dev/shm'), os.listdir('/var/tmp'))\n"
            "open('/tmp/mine', 'wb').write(b'y' * (10 << 20))\nprint('gold ok')")
    runs = run_python_batch([fill, fill, gold, fill, gold], timeout=15, memory_mb=256)
    for r in (runs[2], runs[4]):
        assert r.stdout == "['job'] [] []\ngold ok\n", r


def test_a_job_sees_no_other_process() -> None:
    """A shell job's code is in its command line: a job running beside it (or the runner) is not
    listed in /proc, so a candidate cannot copy the gold command of its batch."""
    from cycleqd.sandbox import run_shell_batch

    gold = "sleep 1.5; echo gold-$((6 * 7))-secret > /dev/null; echo gold"
    spy = ("sleep 0.5; for f in /proc/[0-9]*/cmdline; do tr '\\000' ' ' < $f; echo; done; "
           "ls -d /proc/[0-9]* | wc -l")
    runs = run_shell_batch([({}, gold), ({}, spy)], timeout=10, memory_mb=256)
    assert runs[0].stdout == "gold\n"
    assert "gold-" not in runs[1].stdout and "runner" not in runs[1].stdout, runs[1].stdout
    assert int(runs[1].stdout.split()[-1]) <= 4, runs[1].stdout  # its own shell, loop, tr, ls
