"""The job process's sandbox: entered first thing in the spawned process, before any upload is opened.

Always: resource limits (``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, no core
files). When the daemon runs as root and ``jobs.sandbox.isolate`` is on (the default), also:

- a private mount namespace in which every mount is remounted read-only, a fresh small tmpfs
  is mounted on ``/tmp`` and ``/dev/shm``, and the job's scratch directory is bind-mounted
  read-write at ``/tmp/job`` (the only place the job can write that the daemon will see);
- a new network namespace: no interface but a loopback that is down, so no socket reaches anything;
- the process then drops to an unprivileged user (``jobs.sandbox.user``, ``nobody`` by default),
  clears its supplementary groups and sets ``no_new_privs``.

Without root (or with ``isolate: false``) only the limits apply: :func:`enter` says so, and a job
whose model is code (TorchScript, ``.pt2``) is then refused rather than run unconfined.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import resource
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38
JOB_DIR = Path("/tmp/job")


class SandboxError(RuntimeError):
    """The sandbox could not be set up as asked."""


@dataclass(frozen=True)
class Limits:
    """Plain (picklable) copy of ``jobs.sandbox`` for the job process."""

    cpu_seconds: int = 7200
    memory_bytes: int = 16 << 30
    file_bytes: int = 4 << 30
    open_files: int = 1024
    isolate: bool = True
    user: str = "nobody"


@dataclass
class Entered:
    """Where the job now works, and what confines it (for its report and the tests)."""

    workdir: Path
    isolated: bool = False
    applied: list[str] = field(default_factory=list)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(err)}")


def _mount(libc: ctypes.CDLL, source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    rc = libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data) if data else None)
    _check(rc, f"mount {target}")


def set_limits(limits: Limits) -> list[str]:
    pairs = [
        (resource.RLIMIT_CPU, limits.cpu_seconds, "cpu_seconds"),
        (resource.RLIMIT_AS, limits.memory_bytes, "memory_bytes"),
        (resource.RLIMIT_FSIZE, limits.file_bytes, "file_bytes"),
        (resource.RLIMIT_NOFILE, limits.open_files, "open_files"),
        (resource.RLIMIT_CORE, 0, "core"),
    ]
    applied = []
    for which, value, name in pairs:
        if value and value > 0:
            soft, hard = resource.getrlimit(which)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(which, (value, value))
            applied.append(f"{name}={value}")
    return applied


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            points.append(point)
    return sorted(set(points), key=len)


def _hidden_ancestors(paths: list[str], uid: int, gid: int) -> dict[str, set[str]]:
    """For each path the user could not reach: its first closed directory -> what to bind back into it.

    That is the closed ancestor's child on the way to the path or, where the needed directory is itself
    closed (a checkout cloned into a ``mktemp -d`` directory, mode 0700), every entry in it.
    """
    import stat

    closed: dict[str, set[str]] = {}
    for path in paths:
        parts = Path(path).parts
        for i in range(1, len(parts) + 1):
            here = Path(*parts[:i])
            try:
                st = here.stat()
            except OSError:
                break
            if not stat.S_ISDIR(st.st_mode):
                break
            if st.st_uid == uid:
                bit = stat.S_IXUSR
            elif st.st_gid == gid:
                bit = stat.S_IXGRP
            else:
                bit = stat.S_IXOTH
            if not st.st_mode & bit:
                if i < len(parts):
                    closed.setdefault(str(here), set()).add(str(Path(*parts[: i + 1])))
                else:
                    closed.setdefault(str(here), set()).update(str(here / name) for name in os.listdir(here))
                break
    return closed


def _python_paths() -> list[str]:
    """What the job's Python needs to see: its prefix, the venv, ``sys.path``, and this project's
    checkout (an editable install finds its packages there, not through ``sys.path``)."""
    import sys

    project = str(Path(__file__).resolve().parents[2])
    paths = [sys.base_prefix, sys.prefix, sys.exec_prefix, *(p for p in sys.path if p), project]
    paths.append(os.path.realpath(sys.executable))
    return [os.path.abspath(p) for p in paths if os.path.exists(p)]


def _roots_under(top: str, paths: list[str]) -> list[str]:
    """The outermost of ``paths`` strictly inside ``top`` (none of them inside another)."""
    inside = sorted({p for p in paths if p.startswith(top.rstrip("/") + "/")}, key=len)
    roots: list[str] = []
    for p in inside:
        if not any(p == r or p.startswith(r + "/") for r in roots):
            roots.append(p)
    return roots


def _expose_python(libc: ctypes.CDLL, uid: int, gid: int) -> None:
    """Python's own files (its prefix, the venv, sys.path) may sit under a closed home such as /root:
    hide that directory behind an empty tmpfs and bind back only what Python needs."""
    needed = _python_paths()
    for ancestor, children in _hidden_ancestors(needed, uid, gid).items():
        fds = {child: os.open(child, os.O_PATH) for child in children if os.path.exists(child)}
        try:
            _mount(libc, "tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
            for child, fd in fds.items():
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.mkdir(child)
                else:
                    open(child, "w").close()
                _mount(libc, f"/proc/self/fd/{fd}", child, None, MS_BIND | MS_REC)
        finally:
            for fd in fds.values():
                os.close(fd)


def _isolate(workdir: Path, user: str) -> None:
    """Namespaces, a read-only view but ``/tmp/job``, then the unprivileged user (root only)."""
    libc = _libc()
    entry = pwd.getpwnam(user)
    os.chown(workdir, entry.pw_uid, entry.pw_gid)
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare")
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)  # opened in the new namespace, before /tmp is hidden
    # A checkout or venv under /tmp (a CI clone, say) must stay visible past the fresh tmpfs: bind
    # it back (read-only, like every mount, below).
    keep = {p: os.open(p, os.O_PATH) for p in _roots_under("/tmp", _python_paths())}
    try:
        _mount(libc, "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
        JOB_DIR.mkdir()
        _mount(libc, f"/proc/self/fd/{fd}", str(JOB_DIR), None, MS_BIND)
        for path, kept in keep.items():
            if os.path.isdir(f"/proc/self/fd/{kept}"):
                os.makedirs(path, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "w").close()
            _mount(libc, f"/proc/self/fd/{kept}", path, None, MS_BIND | MS_REC)
        if os.path.isdir("/dev/shm"):
            _mount(libc, "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=256m,mode=1777")
    finally:
        os.close(fd)
        for kept in keep.values():
            os.close(kept)
    _expose_python(libc, entry.pw_uid, entry.pw_gid)
    writable = {"/tmp", str(JOB_DIR), "/dev/shm"}
    for point in _mount_points():
        if point in writable or point.startswith("/proc/"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        rc = libc.mount(None, point.encode(), None, ctypes.c_ulong(flags), None)
        if rc != 0 and point == "/":
            _check(rc, "remount / read-only")
        # Other mounts (/proc, /sys, ...) that refuse a read-only remount stay as they are:
        # the unprivileged user cannot write to them anyway.
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def enter(workdir: Path, limits: Limits) -> Entered:
    """Confine this process; returns the (possibly remapped) scratch directory to work in.

    Raises:
        SandboxError: isolation was asked for, is possible (root), and failed.
    """
    applied = set_limits(limits)
    if not (limits.isolate and os.geteuid() == 0):
        return Entered(workdir, False, applied)
    _isolate(workdir, limits.user)
    os.chdir(JOB_DIR)
    for var in ("TMPDIR", "HOME"):
        os.environ[var] = str(JOB_DIR)
    applied += ["mount+net namespaces", "read-only view but /tmp/job", f"user={limits.user}"]
    return Entered(JOB_DIR, True, applied)
