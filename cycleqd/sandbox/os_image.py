"""The files of an OS-task episode and the views bubblewrap makes of them.

The machine's system is the *system root* ``sys_root``: the OS image's root folder
(:mod:`cycleqd.sandbox.os_rootfs`), or ``/`` (the host's own system folders) where no
image can be built. The layer (``prep``, copied into the episode's tmpfs with root) holds
everything a task may change: the root folder, a copy of the system's world-readable
``/etc`` (password hashes removed), ``/root`` with the skeleton dot-files, ``/home``,
``/tmp``, ``/dev/shm``, ``/usr/local``, ``/run`` and ``/var/{log,tmp,mail,spool,cache,local,opt}``
(with an image, these start as the image's). The system's other folders are bound
read-only over it, except that with root and an image ``/usr`` is a writable overlay of the
image's (``usr`` = image ``/usr`` + the layer's ``usr_upper``, mounted by the machine's own
mount namespace, see :func:`usr_overlay`).

Two views of one machine: :func:`machine_view` (the machine as the agent left it) and
:func:`check_view` (the image's system, loader and start-up files with the agent's files
everywhere else, composed entry by entry from descriptors, see :func:`compose`).
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

ID_BASE = 1 << 30  # host uid/gid of the machine's root (with root): its user n is host user ID_BASE + n
ID_COUNT = 1 << 16
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
MAX_ENTRIES = 400  # per folder a check view composes (more only hurts the agent: the check sees fewer)


def _copy_etc(dst: Path, src: str = "/etc") -> None:
    """The system's /etc (``src``) as a private copy: world-readable files only (secrets are
    not), plus the password databases with every hash removed."""
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
                if not (folder == src and n in ("shadow", "gshadow")):
                    out.add(n)
        return out

    shutil.copytree(src, dst, symlinks=True, ignore_dangling_symlinks=True, ignore=ignore)
    _scrub_passwords(dst / "shadow")
    _scrub_passwords(dst / "gshadow")


def image_etc(name: str) -> bool:
    """Whether the /etc entry ``name`` decides which code runs (checks see the image's, see ``_IMAGE_ETC``)."""
    return name in _IMAGE_ETC or name.startswith(_IMAGE_ETC_PREFIX)


def _chown_tree(root: Path, base: int) -> None:
    """Give a tree to the machine's users: host owner n becomes ``base + n`` (n < 65,536)."""
    def own(p: str) -> None:
        st = os.lstat(p)
        uid = st.st_uid if st.st_uid < ID_COUNT else ID_COUNT - 2
        gid = st.st_gid if st.st_gid < ID_COUNT else ID_COUNT - 2
        os.lchown(p, base + uid, base + gid)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(p, stat.S_IMODE(st.st_mode))  # chown clears set-id bits; keep the mode

    own(str(root))
    for folder, dirs, files in os.walk(root):
        for n in dirs + files:
            own(os.path.join(folder, n))


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


def build_layer(episode: Path, *, quota: bool, mapped: bool, sys_root: str = "/") -> None:
    """The episode's files in ``episode``: ``prep`` (the layer's initial content: root folder,
    /etc copy, the skeleton dot-files in /root, the writable places: empty on the host's
    system, the image's own content with an image), ``image`` (the image's own copies of the
    /etc entries checks must not take from the agent) and ``ctl`` (commands to the shell).
    ``quota``: the layer will be a tmpfs mounted at ``layer``; ``mapped``: the files belong
    to the machine's users (host users ``ID_BASE`` and up); ``sys_root``: the system root.
    """
    d, image, ctl = episode / "prep", episode / "image", episode / "ctl"
    sysr = Path(sys_root)
    own = sys_root != "/"  # an image: its writable places start with its own files
    d.mkdir()
    (d / "rootfs").mkdir()
    _copy_etc(d / "etc", str(sysr / "etc"))
    for sub in ("root", "home", "tmp", "usr_local", "run", "dev_shm", *(f"var_{v}" for v in _VAR_RW)):
        (d / sub).mkdir()
    if own:  # the image's /var/log (its package logs, login records), /var/cache, ... and /home
        for v in _VAR_RW:
            _copy_into(sysr / "var" / v, d / f"var_{v}")
        _copy_into(sysr / "home", d / "home")
    (d / "root").chmod(0o700)
    for sub in ("tmp", "var_tmp", "dev_shm"):
        (d / sub).chmod(0o1777)
    for name in (".bashrc", ".profile"):  # as in Ubuntu's image
        if (sysr / "etc" / "skel" / name).is_file():
            shutil.copy(sysr / "etc" / "skel" / name, d / "root" / name)
    for sub in ("bin", "sbin", "lib", "share", "include", "src", "etc"):
        (d / "usr_local" / sub).mkdir()
    if own:
        _copy_into(sysr / "usr" / "local", d / "usr_local")
    (image / "etc").mkdir(parents=True)
    for name in os.listdir(d / "etc"):
        if image_etc(name):
            src = d / "etc" / name
            if src.is_dir() and not src.is_symlink():
                shutil.copytree(src, image / "etc" / name, symlinks=True)
            else:
                shutil.copy2(src, image / "etc" / name, follow_symlinks=False)
    if quota:
        (episode / "layer").mkdir()
        if own:  # /usr: a writable overlay of the image's (see usr_overlay), its changes in the layer
            for sub in ("usr", "usr_upper", "usr_work"):
                (d / sub).mkdir()
    try:  # the host's memory when the episode began (see kernel_view)
        (episode / "meminfo").write_bytes(Path("/proc/meminfo").read_bytes())
        (episode / "meminfo").chmod(0o444)
    except OSError:
        pass
    ctl.mkdir(mode=0o700)
    if mapped:
        _chown_tree(d, ID_BASE)
        _chown_tree(image, ID_BASE)
        for p in (episode, ctl, *([episode / "layer"] if quota else [])):
            os.chown(p, ID_BASE, ID_BASE)


def _copy_into(src: Path, dst: Path) -> None:
    """Copy the world-readable content of the folder ``src`` into the existing folder ``dst``."""
    if not src.is_dir() or src.is_symlink():
        return
    for name in os.listdir(src):
        p = src / name
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(p), dst / name)
        elif stat.S_ISDIR(st.st_mode):
            if not (st.st_mode & stat.S_IROTH and st.st_mode & stat.S_IXOTH):
                continue
            (dst / name).mkdir(exist_ok=True)
            (dst / name).chmod(stat.S_IMODE(st.st_mode))
            _copy_into(p, dst / name)
        elif stat.S_ISREG(st.st_mode) and (st.st_mode & stat.S_IROTH or st.st_size == 0):
            shutil.copy2(p, dst / name)
        else:
            continue
        # the image's files belong to the machine's users already (see os_rootfs): back to theirs
        os.lchown(dst / name, st.st_uid % ID_BASE, st.st_gid % ID_BASE)


def kernel_view(layer: Path) -> list[str]:
    """/proc (the machine's), /dev and /sys: kernel interfaces read-only; ``/dev/shm`` the layer's."""
    # /proc/tty/driver is the host root's alone (as a container's root, Docker's reads it):
    # an empty folder, so `find /` reports no error there
    mask = ["--tmpfs", "/proc/tty/driver", "--remount-ro", "/proc/tty/driver"] if os.path.isdir("/proc/tty/driver") else []
    # memory as it was when the episode began: an example the agent runs and the same example
    # a check runs moments later (`free`) read the same numbers on a busy host
    meminfo = layer.parent / "meminfo"
    if meminfo.is_file():
        mask += ["--ro-bind", str(meminfo), "/proc/meminfo"]
    return ["--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys", *mask,
            "--ro-bind-try", "/proc/sysrq-trigger", "/proc/sysrq-trigger",
            "--dev", "/dev", "--bind", str(layer / "dev_shm"), "/dev/shm",
            # /dev itself is a tmpfs of bwrap's: read-only, so writes go to the quota'd places
            "--remount-ro", "/dev", "--ro-bind", "/sys", "/sys"]

def var_view(layer: Path, root: str | None = None, sys_root: str = "/") -> list[str]:
    """/var: the system's package databases (an image's whole ``/var/lib``) and empty folders,
    the layer's writable places (``root``: see :func:`system_view`)."""
    a = ["--dir", "/var"]
    var = Path(sys_root) / "var"
    for entry in sorted(os.listdir(var)):
        p = var / entry
        if entry in _VAR_RW:
            continue
        if p.is_symlink():
            if root is None or not os.path.lexists(f"{root}/var/{entry}"):
                a += ["--symlink", os.readlink(p), f"/var/{entry}"]
        elif entry == "lib":
            a += ["--dir", "/var/lib"]
            for keep in (_VAR_LIB if sys_root == "/" else sorted(os.listdir(p))):
                if (p / keep).exists():
                    a += ["--ro-bind", str(p / keep), f"/var/lib/{keep}"]
        elif p.is_dir():
            a += ["--dir", f"/var/{entry}"]  # the host's data (backups, www, ...) is not the image's
    for v in _VAR_RW:
        a += ["--bind", str(layer / f"var_{v}"), f"/var/{v}"]
    return a

def usr_overlay(layer: Path) -> bool:
    """Whether the layer holds /usr as a writable overlay of the image's (with root and an
    image: the machine's mount namespace mounts ``usr`` = image ``/usr`` + ``usr_upper``)."""
    return (layer.parent / "prep" / "usr_upper").is_dir()


def system_view(root: str | None = None, sys_root: str = "/", usr: Path | None = None) -> list[str]:
    """The image's system: the system root's read-only top-level folders and /usr. With ``root``
    (the machine's root folder, where earlier views made them) links already there are kept.
    ``usr``: the writable overlay of the image's /usr to show instead (the agent's view)."""
    a = []
    top = Path(sys_root)
    for entry in sorted(os.listdir(top)):
        p = top / entry
        if p.is_symlink():
            if root is None or not os.path.lexists(f"{root}/{entry}"):
                a += ["--symlink", os.readlink(p), f"/{entry}"]
        elif entry in _RO_TOP and p.is_dir():
            a += ["--ro-bind", str(p), f"/{entry}"]
    if usr is not None:
        return a + ["--bind", str(usr), "/usr"]
    a += ["--dir", "/usr"]
    for entry in sorted(os.listdir(top / "usr")):
        if entry == "local":
            continue
        p = top / "usr" / entry
        if not p.is_symlink():
            a += ["--ro-bind", str(p), f"/usr/{entry}"]
        elif root is None or not os.path.lexists(f"{root}/usr/{entry}"):
            a += ["--symlink", os.readlink(p), f"/usr/{entry}"]
    return a

def machine_view(layer: Path, ctl: Path, state: str | None = None, sys_root: str = "/") -> list[str]:
    """The agent's machine: its writable root with the image's system in it. ``state``: the
    layer as the worker reaches it (see :func:`check_view`); None for the first view, which
    makes the root folder's links and mount points."""
    d = layer
    root = None if state is None else f"{state}/rootfs"
    usr = d / "usr" if sys_root != "/" and usr_overlay(layer) else None
    a = ["--bind", str(d / "rootfs"), "/", *system_view(root, sys_root, usr)]
    for entry in _EMPTY_TOP:
        a += ["--dir", f"/{entry}"]
    a += ["--bind", str(d / "usr_local"), "/usr/local", *var_view(layer, root, sys_root)]
    a += ["--bind", str(d / "etc"), "/etc", "--bind", str(d / "root"), "/root",
          "--bind", str(d / "home"), "/home", "--bind", str(d / "tmp"), "/tmp",
          "--bind", str(d / "run"), "/run", "--ro-bind", str(ctl), "/run/cycleqd", *kernel_view(layer)]
    return a

def check_view(layer: Path, image: Path, state: str, fds: list[int], sys_root: str = "/") -> list[str]:
    """The machine as a check sees it: the image's system, loader and start-up files
    (never the agent's, wherever it put or moved them), the agent's files everywhere else.

    Folders where both meet (``/``, ``/usr``, ``/usr/local``, ``/etc``) are composed entry
    by entry from descriptors opened without following links, so nothing the agent
    renames or replaces while the view is built can bring a path of the host into it.
    """
    d = layer
    host_usr = set(os.listdir(Path(sys_root) / "usr"))
    top_links = {e for e in os.listdir(sys_root) if os.path.islink(Path(sys_root) / e)}
    a = system_view(None, sys_root)
    a += compose(state, "rootfs", "", _MANAGED_TOP | top_links, fds)
    # the agent's new entries directly in /usr (in the overlay's upper folder where /usr is one)
    overlay = sys_root != "/" and usr_overlay(layer)
    a += compose(state, "usr_upper" if overlay else "rootfs/usr", "/usr", host_usr | _IMAGE_ABSENT_USR, fds)
    if overlay:
        a += _mode_view(state, Path(sys_root), image.parent / "views")
    a += _local_view(state, image.parent / "views", compose(state, "usr_local", "/usr/local", {"lib"}, fds))
    # the image's (an image's own, read-only; else empty): no .pth, sitecustomize or library of the agent's
    own_lib = Path(sys_root) / "usr" / "local" / "lib"
    a += (["--ro-bind", str(own_lib), "/usr/local/lib"] if sys_root != "/" and own_lib.is_dir()
          else ["--dir", "/usr/local/lib"])
    a += ["--dir", "/etc"] + compose(state, "etc", "/etc", set(), fds, skip=image_etc)
    for name in sorted(os.listdir(image / "etc")):
        src = image / "etc" / name
        a += (["--symlink", os.readlink(src), f"/etc/{name}"] if src.is_symlink()
              else ["--ro-bind", str(src), f"/etc/{name}"])
    a += var_view(layer, None, sys_root)
    # the agent's new entries directly in /var (``mkdir /var/k``), as docker exec sees them
    a += compose(state, "rootfs/var", "/var", set(os.listdir(Path(sys_root) / "var")) | set(_VAR_RW), fds)
    a += ["--bind", str(d / "root"), "/root", "--bind", str(d / "home"), "/home",
          "--bind", str(d / "tmp"), "/tmp", "--bind", str(d / "run"), "/run", *kernel_view(layer)]
    return a

def _mode_view(state: str, sys_root: Path, views: Path) -> list[str]:
    """The image's commands with the agent's mode, owner and times: for each command of the
    image's ``/usr/bin`` and ``/usr/sbin`` the agent changed (``chmod u+s /usr/bin/find``), a
    copy of the image's file (never the agent's content) carrying the agent's metadata, so a
    check's ``ls -l`` reads what ``docker exec`` would while it still runs the image's code."""
    out: list[str] = []
    views.mkdir(exist_ok=True)
    base = Path(tempfile.mkdtemp(dir=views))
    base.chmod(0o755)
    kept = 0
    for sub in ("bin", "sbin"):
        try:
            dfd = os.open(f"{state}/usr_upper/{sub}", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            for name in sorted(os.listdir(dfd)):
                if kept >= MAX_ENTRIES:
                    break
                mine = sys_root / "usr" / sub / name
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode) or not stat.S_ISREG(os.lstat(mine).st_mode):
                        continue
                    copy = base / f"{sub}-{name}"
                    shutil.copyfile(mine, copy)
                    os.chown(copy, st.st_uid, st.st_gid)
                    os.chmod(copy, stat.S_IMODE(st.st_mode))
                    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
                except OSError:
                    continue
                kept += 1
                out += ["--ro-bind", str(copy), f"/usr/{sub}/{name}"]
        finally:
            os.close(dfd)
    return out


def _local_view(state: str, views: Path, entries: list[str]) -> list[str]:
    """/usr/local for a check: a folder of the harness's holding a mount point for each of the
    agent's entries (``entries``: :func:`compose`'s arguments) and ``lib``, with the time stamp
    of the agent's /usr/local, so ``ls -lt /usr`` sorts it where the agent's shell does."""
    views.mkdir(exist_ok=True)
    base = Path(tempfile.mkdtemp(dir=views))
    base.chmod(0o755)
    out: list[str] = []
    for i in range(0, len(entries), 3):
        kind, src, dst = entries[i:i + 3]
        name = dst.rsplit("/", 1)[1]
        if kind == "--symlink":
            os.symlink(src, base / name)
            continue
        if stat.S_ISDIR(os.fstat(int(src.rsplit("/", 1)[1])).st_mode):
            (base / name).mkdir()
        else:
            (base / name).touch()
        out += [kind, src, dst]
    (base / "lib").mkdir(exist_ok=True)
    try:
        st = os.stat(f"{state}/usr_local")
        os.utime(base, ns=(st.st_atime_ns, st.st_mtime_ns))
    except OSError:
        pass
    return ["--ro-bind", str(base), "/usr/local", *out]


def compose(state: str, rel: str, dst: str, names: set[str], fds: list[int], skip=None) -> list[str]:
    """Bind every entry of the layer's folder ``rel`` at ``dst`` except ``names`` (and those
    ``skip`` says yes to), at most ``MAX_ENTRIES``; the descriptors opened go to ``fds``."""
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
            if kept >= MAX_ENTRIES:
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
