"""The OS machine runs on its own image (a Debian root filesystem built with mmdebstrap, see
cycleqd.sandbox.os_rootfs), not on the host's system folders; where no image can be built it
falls back to the host's, saying so once."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cycleqd.sandbox import bwrap_available
from cycleqd.sandbox.os_env import OSSession
from cycleqd.sandbox.os_image import usr_overlay
from cycleqd.sandbox.os_rootfs import IMAGES, image_root, spec
from cycleqd.tasks.os_interaction import load_problems

pytestmark = pytest.mark.skipif(not bwrap_available(), reason="bubblewrap (bwrap) missing or cannot start here")
needs_image = pytest.mark.skipif(image_root("default") is None, reason="OS image not built (make os-image)")
REPO = Path(__file__).resolve().parents[2]


@needs_image
def test_the_machine_is_the_image_not_the_host() -> None:
    """The shell and the checks see the image's /usr (hundreds of MB, the official images'
    tools, no host-only program such as bwrap), its own /etc and /var/log, files owned by the
    machine's root, and a writable /usr for new files; the host's programs are not there."""
    assert shutil.which("bwrap")  # on the host
    with OSSession(memory_mb=1024) as s:
        assert s.sys_root == str(image_root("default"))
        tools = "python3 pip3 git vim curl wget unzip zip tree ps useradd"
        look = (f"for c in {tools} bwrap; do command -v $c >/dev/null && echo have-$c; done; "
                "du -sm /usr | cut -f1; ls /var/log | tr '\\n' ' '; echo; stat -c %U /usr/bin/bash; "
                "cat /etc/hostname")
        for out in (s.run(look, timeout=60).output, s.run_script("bash", look, [], timeout=60).output):
            lines = out.split("\n")
            assert [w.removeprefix("have-") for w in lines[:11]] == tools.split(), out
            assert 100 < int(lines[11]) < 600, out  # MB: the image's /usr, not the host's
            assert "btmp" in lines[12] and "wtmp" in lines[12], out
            assert lines[13:15] == ["root", "ubuntu"], out
        r = s.run("echo hi > /usr/OSbench && cat /usr/OSbench; touch /usr/bin/x 2>&1; echo $?", timeout=10)
        writable = usr_overlay(s.layer)  # with root: /usr is a writable overlay of the image's
        assert r.output.split("\n")[0] == "hi" and r.output.strip().endswith("0" if writable else "1"), r.output
        assert s.run_script("bash", "cat /usr/OSbench", [], timeout=10).output == "hi\n"


@needs_image
def test_usr_is_a_writable_overlay_the_image_never_changes() -> None:
    """With root the agent's /usr is a copy-on-write overlay of the image's (AgentBench 6/new.json #3
    runs ``chmod u+s /usr/bin/find`` in its init): the shell and a check's ``ls -l`` see the new mode,
    a check still runs the image's code when the agent rewrites a command, the image's files are
    untouched and the next episode starts from the image again."""
    find = image_root("default") / "usr/bin/find"
    before = (find.stat().st_mode, find.read_bytes())
    with OSSession(memory_mb=1024) as s:
        if not usr_overlay(s.layer):
            pytest.skip("no root here: /usr stays the image's, read-only")
        r = s.run("chmod u+s /usr/bin/find && ls -l /usr/bin/find | cut -c1-10; "
                  "printf '#!/bin/sh\\necho fooled\\n' > /usr/bin/mawk; awk 'BEGIN{print 1}'", timeout=10)
        assert r.output == "-rwsr-xr-x\nfooled\n", r.output
        check = s.run_script("bash", "ls -l /usr/bin/find | cut -c1-10; echo | awk '{print 7}'", [], timeout=10)
        assert check.output == "-rwsr-xr-x\n7\n", check.output
    assert (find.stat().st_mode, find.read_bytes()) == before
    with OSSession(memory_mb=1024) as s:
        assert s.run("ls -l /usr/bin/find | cut -c1-10", timeout=10).output == "-rwxr-xr-x\n"


def test_problems_name_their_image() -> None:
    """AgentBench's create.local picks the image: packages (with npm) or default."""
    rows = [{"description": "d", "create": {"local": "packages"}, "evaluation": {"match": "1"}},
            {"description": "d", "create": {"local": "default"}, "evaluation": {"match": "1"}},
            {"description": "d", "evaluation": {"match": "1"}}]
    assert [p.image for p in load_problems(rows, Path("."))] == ["packages", "default", "default"]
    assert set(IMAGES["packages"]) - set(IMAGES["default"]) == {"npm"}
    with pytest.raises(KeyError, match="known: default, packages"):
        spec("ubuntu")


@pytest.mark.skipif(image_root("packages") is None, reason="OS image 'packages' not built (make os-image)")
def test_the_packages_image_has_npm() -> None:
    with OSSession(memory_mb=1024, image="packages") as s:
        assert s.run("npm --version >/dev/null && echo ok", timeout=60).output.strip() == "ok"
    with OSSession(memory_mb=1024) as s:
        assert "npm" not in s.run("command -v npm || echo none", timeout=10).output.replace("none", "")


def test_without_an_image_the_host_layer_says_so_once(tmp_path) -> None:
    """An image cache that cannot be written: every session runs on the host's system folders
    and one warning says so."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = ("import warnings\nfrom cycleqd.sandbox.os_env import OSSession\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    for _ in range(2):\n"
            "        with OSSession(memory_mb=512) as s:\n"
            "            print(s.sys_root, s.run('echo ok', timeout=10).output.strip())\n"
            "print(len([x for x in w if 'unavailable' in str(x.message)]))\n")
    env = dict(os.environ, CYCLEQD_OS_IMAGES=str(blocker / "images"), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.stdout.split("\n")[:3] == ["/ ok", "/ ok", "1"], out.stdout + out.stderr
