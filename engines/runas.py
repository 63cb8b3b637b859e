"""Who customer code runs as: the customer's own OS user, never Kasa's.

Every command that comes from a customer's configuration or a release package
(PM2 and its daemon, start/stop commands, upgrade hooks) runs as the customer's
`run_as` user with a clean environment, a umask of 027 and no descriptor of
Kasa's: a process of another uid cannot read the worker's /proc/<pid>/environ,
its key files or its control database (all 0600 in a 0700 folder).

Plain Python, no Django: callers pass the user name and Kasa's own uid.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass

CUSTOMER_UMASK = 0o027  # files a customer's code creates: group may read, others nothing
KASA_UMASK = 0o077  # Kasa's own files: nobody else


class RunAsError(ValueError):
    """`run_as` cannot be used: the message says why, for humans."""


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    gid: int
    home: str

    def __str__(self) -> str:
        return f"{self.user} (uid {self.uid})"


def lookup(name: str, *, kasa_uid: int | None = None) -> Identity:
    """The OS user `name`, refused when it is missing, root, or Kasa's own user (`kasa_uid`, default: ours)."""
    name = (name or "").strip()
    if not name:
        raise RunAsError("no run_as user is set")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise RunAsError(f"run_as user {name!r} does not exist on this machine") from None
    if entry.pw_uid == 0:
        raise RunAsError(f"run_as user {name!r} is root: customer code never runs as root")
    own = os.geteuid() if kasa_uid is None else kasa_uid
    if entry.pw_uid == own:
        raise RunAsError(f"run_as user {name!r} is Kasa's own user: customer code must not run within reach of "
                         "Kasa's keys")
    return Identity(user=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir)


def can_switch_to(identity: Identity) -> bool:
    """Whether this process may start children as `identity` (root, or already that user)."""
    return os.geteuid() == 0 or os.geteuid() == identity.uid


def popen_kwargs(identity: Identity | None) -> dict:
    """subprocess.Popen arguments that start a child as `identity` with no supplementary groups and the
    customer umask; for None (development's fallback to Kasa's user) only the umask."""
    if identity is None:
        return {"umask": CUSTOMER_UMASK}
    if not can_switch_to(identity):
        raise RunAsError(f"the worker runs as uid {os.geteuid()} and cannot start commands as {identity}: run the "
                         "worker as root (it switches to each customer's user), see README 'Security model'")
    return {"user": identity.uid, "group": identity.gid, "extra_groups": [], "umask": CUSTOMER_UMASK}


def give(path: str | os.PathLike, identity: Identity | None, *, recursive: bool = False) -> None:
    """Make `path` (and, recursively, what is below it) belong to `identity`, symlinks themselves included and
    never followed. No-op for None or when we are not root (an unprivileged worker's files are its own).

    The walk goes through directory descriptors opened without following links (os.fwalk): a customer who
    swaps a folder for a link while we walk cannot make root chown anything outside the tree."""
    if identity is None or os.geteuid() != 0:
        return
    os.chown(path, identity.uid, identity.gid, follow_symlinks=False)
    if not recursive or os.path.islink(path) or not os.path.isdir(path):
        return
    for _dirpath, dirnames, filenames, dirfd in os.fwalk(path, follow_symlinks=False):
        for name in dirnames + filenames:
            try:
                os.chown(name, identity.uid, identity.gid, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:  # removed meanwhile by the customer's own code: nothing to give
                pass



def give_fd(fd: int, identity: Identity | None) -> None:
    """give() for a file Kasa holds open (before it is renamed into a folder the customer's user can write)."""
    if identity is not None and os.geteuid() == 0:
        os.fchown(fd, identity.uid, identity.gid)


def may_access(path: str | os.PathLike, identity: Identity, mode: int = os.X_OK) -> bool:
    """Whether `identity` (its own uid and primary group: customer code runs without supplementary groups) may
    pass through every folder above `path` and has `mode` (os.R_OK | os.W_OK | os.X_OK) on `path` itself,
    symlinks resolved. From the permission bits, whoever we are (os.access answers for Kasa, not the user)."""
    path = os.path.realpath(path)
    for i, p in enumerate((path, *_parents(path))):
        try:
            st = os.stat(p)
        except OSError:
            return False
        want = mode if i == 0 else os.X_OK
        if identity.uid == 0:
            continue
        if st.st_uid == identity.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid == identity.gid:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        if bits & want != want:
            return False
    return True


def _parents(path: str) -> list[str]:
    out = []
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return out
        out.append(parent)
        path = parent


class NotOwned(OSError):
    """A file in a customer's folder that Kasa refuses to read for it (not a regular file of the customer's)."""


def read_owned(path: str | os.PathLike, identity: Identity | None, *, limit: int = 1 << 20,
               tail: bool = False) -> bytes:
    """At most `limit` bytes (the last ones with tail=True) of a regular file that `identity` owns.

    For files named by the customer's side (a PM2 log path from `pm2 jlist`, a pid file in its PM2 home, an
    ecosystem file in its root): Kasa reads as root, and a symlink, a FIFO, or a folder swapped for a link to
    Kasa's own files would make it read (or hang on) what the customer may not. A file the customer's user owns
    holds nothing it could not read itself. For None (development's fallback, everything is Kasa's) only the
    regular-file check."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise NotOwned(exc.errno, f"cannot read {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotOwned(f"{path} is not a regular file")
        if identity is not None and os.geteuid() == 0 and st.st_uid != identity.uid:
            raise NotOwned(f"{path} does not belong to {identity.user}")
        if tail and st.st_size > limit:
            os.lseek(fd, st.st_size - limit, os.SEEK_SET)
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
