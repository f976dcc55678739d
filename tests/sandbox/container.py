"""Run a process in an image's root filesystem, as a container runtime would (there is none here).

``rootfs_prefix()`` returns the argv prefix that, in a new mount namespace,

- mounts the image's root filesystem through overlayfs (the image's unpacked folder is the lower
  layer and is never written; a per-container upper layer takes the writes, and is where mount
  points for volumes are made), read-only for ``readOnlyRootFilesystem``;
- gives it ``/proc``, a minimal ``/dev`` (null, zero, full, random, urandom, tty, ``shm``), a
  read-only ``/sys``, and bind mounts (volumes, the ServiceAccount token, ``/etc/hosts``);
- then ``chroot``s into it, changes to the working directory, drops to the user and group (no
  supplementary groups) and executes the command, found on the ``PATH`` of the environment the
  process was started with (the image's), looked up inside the image.

Each step ``exec``s the next, so the process keeps its PID from start to finish. Needs root (mount
namespaces, overlayfs, chroot) and ``unshare`` from util-linux.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path, PurePosixPath

# Device nodes every container gets (the OCI runtime spec's default devices).
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
STDIO = ("stdin", "stdout", "stderr")  # /dev/stdin → /proc/self/fd/0, and so on
MAX_SYMLINKS = 40  # as the kernel's limit when resolving a path

# Runs on the host's Python before the image's program replaces it: chroot, working directory,
# user, exec. Python rather than chroot(1): the working directory and the user must change after
# the chroot, and the image need not have a shell or coreutils.
_ENTER = """
import os, sys
root, workdir, user, group, *argv = sys.argv[1:]
os.chroot(root)
os.chdir(workdir)
if user:
    os.setgroups([])
    os.setgid(int(group))
    os.setuid(int(user))
# Searched here: after the chroot, os.execvp could not import what it needs from the host.
program = argv[0]
if "/" not in program:
    for folder in os.environ.get("PATH", "/usr/bin:/bin").split(":"):
        if os.access(folder + "/" + program, os.X_OK):
            program = folder + "/" + program
            break
os.execv(program, argv)
"""


def resolve_in_root(rootfs: Path, path: str) -> str:
    """Resolve ``path`` as the image sees it, following the image's symlinks inside ``rootfs``
    (``/var/run`` → ``/run`` in Debian), so a mount point is never made through a symlink that
    points out of the image onto the host. Components that do not exist are kept as written."""
    todo = list(PurePosixPath(path).parts[1:])
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = rootfs.joinpath(*done, part)
        if here.is_symlink():
            hops += 1
            if hops > MAX_SYMLINKS:
                raise ValueError(f"too many symlinks resolving {path} in {rootfs}")
            target = PurePosixPath(os.readlink(here))
            if target.is_absolute():
                done = []
                todo = list(target.parts[1:]) + todo
            else:
                todo = list(target.parts) + todo
            continue
        done.append(part)
    return "/" + "/".join(done)


def image_user(rootfs: Path, spec: str) -> tuple[int, int]:
    """The image config's ``User`` (``uid``, ``uid:gid``, or names from the image's
    ``/etc/passwd`` and ``/etc/group``) as numbers; root for an empty one."""
    if not spec:
        return 0, 0
    user, _, group = spec.partition(":")

    def lookup(name: str, table: str, field: int) -> int:
        if name.isdigit():
            return int(name)
        for line in (rootfs / "etc" / table).read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return int(fields[field])
        raise LookupError(f"{table}: no entry {name!r} in the image")

    uid = lookup(user, "passwd", 2)
    if group:
        return uid, lookup(group, "group", 2)
    if user.isdigit():
        return uid, uid
    return uid, lookup(user, "passwd", 3)


def rootfs_prefix(
    *,
    rootfs: Path,
    scratch: Path,
    binds: list[tuple[str, str]],
    read_only: bool,
    user: tuple[int, int] | None,
    workdir: str = "/",
    read_only_binds: frozenset[str] = frozenset(),
) -> list[str]:
    """The argv prefix that runs a command in ``rootfs`` (see the module docstring).

    Args:
        rootfs: the image's unpacked root filesystem (only ever read).
        scratch: a folder for this container's upper layer (emptied here) and mount point.
        binds: (host path, path in the container) to bind-mount; files or folders.
        read_only: mount the root filesystem read-only (the binds keep their own mode).
        user: (uid, gid) to run as; None stays root.
        workdir: the working directory inside the container.
        read_only_binds: container paths of binds to mount read-only.
    """
    for path in (rootfs, scratch):
        if any(c in str(path) for c in ",:"):
            raise ValueError(f"overlayfs cannot take {path}: no ',' or ':' in its path")
    upper, work, root = scratch / "upper", scratch / "work", scratch / "root"
    q = shlex.quote
    r = q(str(root))
    steps = [
        f"rm -rf {q(str(upper))} {q(str(work))}",
        f"mkdir -p {q(str(upper))} {q(str(work))} {r}",
        f"mount -t overlay overlay -o lowerdir={q(str(rootfs))},upperdir={q(str(upper))},"
        f"workdir={q(str(work))} {r}",
        f"mkdir -p {r}/proc {r}/dev {r}/sys",
        f"mount -t proc -o nosuid,nodev,noexec proc {r}/proc",
        f"mount -t tmpfs -o nosuid,mode=755,size=1m tmpfs {r}/dev",
    ]
    for dev in DEVICES:
        steps.append(f"touch {r}/dev/{dev} && mount --bind /dev/{dev} {r}/dev/{dev}")
    steps += [
        f"ln -s /proc/self/fd {r}/dev/fd",
        *(f"ln -s /proc/self/fd/{i} {r}/dev/{n}" for i, n in enumerate(STDIO)),
        # The container's own /dev/shm, inside its root filesystem (not the host's).
        f"mkdir {r}/dev/shm && mount -t tmpfs -o nosuid,nodev,mode=1777 shm {r}/dev/shm",  # noqa: S108
        f"mount -t sysfs -o ro,nosuid,nodev,noexec sysfs {r}/sys",
    ]
    for src, dst in binds:
        inside = q(str(root) + resolve_in_root(rootfs, dst))
        make = (
            f"mkdir -p {inside}"
            if Path(src).is_dir()
            else (f"mkdir -p $(dirname {inside}) && touch {inside}")
        )
        steps.append(f"{make} && mount --rbind {q(src)} {inside}")
        if dst in read_only_binds:
            steps.append(f"mount -o remount,bind,ro {inside}")
    if read_only:
        steps.append(f"mount -o remount,bind,ro {r}")
    uid, gid = ("", "") if user is None else (str(user[0]), str(user[1]))
    enter = [sys.executable, "-I", "-S", "-c", _ENTER, str(root), workdir, uid, gid]
    script = " && ".join([*steps, f'exec {shlex.join(enter)} "$@"'])
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"]
