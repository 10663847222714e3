"""The OS task's machine image: a small Debian root filesystem, built once and cached.

AgentBench (and fishfarm, which the official CycleQD code runs) plays its OS problems in
Docker images built ``FROM ubuntu`` with ``apt install python3 python3-pip git vim curl
wget unzip zip tree`` (``local-os/default``), plus ``npm`` (``local-os/packages``). Here
the same packages are installed with ``mmdebstrap`` (variant ``minbase``, no
recommended packages, no documentation: Ubuntu's container images leave these out too)
into a folder under ``.cache/os-image/<name>-<key>/rootfs``; ``key`` is a hash of
everything that decides its content (suite, variant, packages, options), so a changed
list builds a new image and an unchanged one is never built again.

Ask for an image with :func:`image_root` (the cached one, else None) or :func:`ensure_image`
(builds it where it is missing, under a lock, so concurrent workers build it once).
``make install`` builds every image (``python -m cycleqd.sandbox.os_rootfs``).

The cached tree belongs to the machine's users (host users ``ID_BASE`` and up, see
:mod:`cycleqd.sandbox.os_image`), has no set-id bits (inside the machine nothing gains
privileges anyway), and is only ever mounted read-only: an episode never writes to it
(with root an episode's ``/usr`` is a copy-on-write overlay whose changes stay in its layer).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
VARIANT = "minbase"
# What `FROM ubuntu` brings beyond Debian's minbase (user tools, ps, hostname, certificates,
# less), then what the official Dockerfiles install.
_BASE = ("passwd", "adduser", "procps", "hostname", "ca-certificates", "less")
_DEFAULT = ("python3", "python3-pip", "git", "vim", "curl", "wget", "unzip", "zip", "tree")
IMAGES: dict[str, tuple[str, ...]] = {
    "default": (*_BASE, *_DEFAULT),       # fishfarm's res/dockerfiles/default
    "packages": (*_BASE, *_DEFAULT, "npm"),  # res/dockerfiles/packages
}
# Ubuntu's container images keep no documentation, manuals or translations.
_DPKG_OPTS = ("path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
              "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
              "path-exclude=/usr/share/locale/*", "path-exclude=/usr/share/lintian/*")
SOURCE_DATE_EPOCH = 1700000000  # fixed time stamps: the same packages give the same tree
_FALLBACK_MIRROR = "http://deb.debian.org/debian"


class ImageUnavailable(RuntimeError):
    """The image is not built and cannot be built here (the reason is the message)."""


@dataclass(frozen=True)
class ImageSpec:
    """Everything that decides an image's content."""

    name: str
    packages: tuple[str, ...]
    suite: str = SUITE
    variant: str = VARIANT

    @property
    def key(self) -> str:
        text = json.dumps([self.suite, self.variant, sorted(self.packages), _DPKG_OPTS, SOURCE_DATE_EPOCH])
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def spec(name: str) -> ImageSpec:
    """The image ``name`` (``default`` or ``packages``).

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    if name not in IMAGES:
        raise KeyError(f"unknown OS image {name!r}; known: {', '.join(sorted(IMAGES))}")
    return ImageSpec(name, IMAGES[name])


def cache_dir() -> Path:
    """Where images live: ``$CYCLEQD_OS_IMAGES``, else ``.cache/os-image`` of this checkout."""
    env = os.environ.get("CYCLEQD_OS_IMAGES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "os-image"


def image_root(name: str = "default") -> Path | None:
    """The root folder of the built image ``name``, or None where it is not built (or not readable)."""
    s = spec(name)
    folder = cache_dir() / f"{s.name}-{s.key}"
    try:
        if (folder / "manifest.json").is_file() and (folder / "rootfs" / "usr" / "bin" / "bash").exists():
            return folder / "rootfs"
    except OSError:
        pass
    return None


def mirror() -> str:
    """The Debian mirror apt uses here (first ``deb`` URI of the sources), else deb.debian.org."""
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        try:
            for line in f.read_text().splitlines():
                if line.startswith("URIs:") and "security" not in line:
                    return line.split()[1]
        except OSError:
            continue
    try:
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[2] if parts[1].startswith("[") else parts[1]
    except OSError:
        pass
    return _FALLBACK_MIRROR


def ensure_image(name: str = "default", *, log=None) -> Path:
    """The image ``name``'s root folder, built first where it is missing (once: a lock keeps
    concurrent callers from building it twice).

    Raises:
        ImageUnavailable: not root, no ``mmdebstrap``, or the build failed (the mirror is
            unreachable, ...): the message says which.
    """
    found = image_root(name)
    if found is not None:
        return found
    s = spec(name)
    if os.geteuid() != 0:
        raise ImageUnavailable("building the OS image needs root (make install as root)")
    tool = shutil.which("mmdebstrap")
    if tool is None:
        raise ImageUnavailable("mmdebstrap is missing (apt-get install mmdebstrap, or make system-deps)")
    base = cache_dir()
    try:
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)  # the machine's root (an unknown user of the host) binds folders from it
        lock = open(base / ".lock", "w")  # noqa: SIM115 (held by the with below)
    except OSError as e:
        raise ImageUnavailable(f"cannot write the image cache {base}: {e}") from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = image_root(name)
        if found is not None:
            return found
        folder = base / f"{s.name}-{s.key}"
        part = base / f".{s.name}-{s.key}.part"
        shutil.rmtree(part, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        part.mkdir()
        argv = [tool, f"--variant={s.variant}", f"--include={','.join(s.packages)}", "--mode=root",
                *(f"--dpkgopt={o}" for o in _DPKG_OPTS),
                "--customize-hook=echo ubuntu > \"$1/etc/hostname\"",
                s.suite, str(part / "rootfs"), mirror()]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}
        t0 = time.monotonic()
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, check=False)
        if r.returncode != 0:
            shutil.rmtree(part, ignore_errors=True)
            tail = r.stdout.decode(errors="replace").strip().splitlines()[-3:]
            raise ImageUnavailable(f"mmdebstrap failed ({r.returncode}): {' | '.join(tail)}")
        _strip_setid(part / "rootfs")
        _give_to_machine(part / "rootfs")
        size = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(part / "rootfs") for f in fs)
        manifest = {"name": s.name, "key": s.key, "suite": s.suite, "variant": s.variant,
                    "packages": list(s.packages), "mirror": mirror(), "bytes": size,
                    "build_seconds": round(time.monotonic() - t0, 1)}
        (part / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        part.rename(folder)
        if log is not None:
            log(f"built OS image {s.name} ({size / 2**20:.0f} MiB) in {manifest['build_seconds']} s: {folder}")
        return folder / "rootfs"


def _strip_setid(root: Path) -> None:
    """Drop set-uid / set-gid bits (nothing gains privileges inside; outside nothing should)."""
    for folder, _, files in os.walk(root):
        for n in files:
            p = os.path.join(folder, n)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(p, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))


def _give_to_machine(root: Path) -> None:
    """Owner n becomes host user ``ID_BASE + n``: the machine's own users (see
    :mod:`cycleqd.sandbox.os_image`), so its root reads every file of its image (``ls -l``
    shows root, as in Docker), while the tree stays read-only to it (mounted so)."""
    from cycleqd.sandbox.os_image import ID_BASE, _chown_tree

    _chown_tree(root, ID_BASE)


_failed: dict[str, str] = {}  # image name -> why it could not be built (tried once per process)


def system_root(name: str = "default") -> Path | None:
    """The image to run an episode on: the built image ``name`` (built now where it is
    missing and can be), else None (the host's system folders), saying so once per process."""
    found = image_root(name)
    if found is not None or name in _failed:
        return found
    try:
        return ensure_image(name)
    except ImageUnavailable as e:
        first = not _failed
        _failed[name] = str(e)
        if first:
            warnings.warn(f"OS image {name!r} unavailable ({e}); the OS machine uses the host's system "
                          "folders instead (see docs/os_environment.md)", stacklevel=2)
        return None


def main(argv: list[str] | None = None) -> int:
    """``python -m cycleqd.sandbox.os_rootfs [NAME ...]``: build (or find) the images."""
    names = (argv if argv is not None else sys.argv[1:]) or sorted(IMAGES)
    for name in names:
        try:
            root = ensure_image(name, log=print)
        except ImageUnavailable as e:
            print(f"OS image {name}: not built: {e}")
            return 1
        print(f"OS image {name}: {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
