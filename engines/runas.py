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
