"""What a remote backup asks of a customer's host, as pure functions that run *there* (engines.hostcall).

The local path checks a customer's folders with the worker's own filesystem (Customer.folder_problems,
customers.roots, engines.paths); for a customer on another host those paths only mean something on the host, so
the same rules run on the host, with its filesystem, in one call (`backup_facts`): the root lies strictly inside
the host's customers root once every link is followed, it is, holds and lies in no other customer's root of that
host, each service folder and SQLite file resolves inside the root. No Django there: plain engines code shipped
for the session.

The worker treats every answer as untrusted (backups.remote checks its shape): a hostile host can lie about its
own files, never make the worker read or write one of its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import dbprobe, ownership, paths, runas

COPY_PREFIX = "kasa-sqlite-"
COPY_MAX_AGE = 24 * 3600  # a private copy older than this was left by a backup that lost its host


def backup_facts(customers_root: str, root: str, others: list[str], services: list[list[str]],
                 sqlite: list[list[str]]) -> dict:
    """Everything a backup of one customer needs to know of its folders on this host, checked now.

    `others`: the other customers' roots on this host; `services`: [name, path] pairs; `sqlite`: [name, path]
    pairs. Returns {"problems": [...], "root": real root, "services": {name: {"path": rel, "link": …}},
    "sqlite": {name: real path}}; with problems, nothing else is to be used."""
    out: dict = {"problems": [], "root": "", "services": {}, "sqlite": {}}
    try:
        real_root = paths.resolve_strictly_inside(root, customers_root, what="root folder")
    except paths.PathEscapeError as exc:
        out["problems"].append(f"{exc} (the host's customers root)")
        return out
    if not real_root.is_dir():
        out["problems"].append(f"root folder {root} does not exist")
        return out
    shown = root if str(real_root) == os.path.normpath(root) else f"{root} (really {real_root})"
    for other in others:
        if how := paths.overlap(real_root, Path(os.path.realpath(other))):
            out["problems"].append(f"root folder {shown} {how} another customer's root folder: each customer's "
                                   "folder is its own")
            return out
    out["root"] = str(real_root)
    for name, rel in services:
        try:
            folder = paths.resolve_inside(rel or ".", real_root, what=f"service {name} path")
        except paths.PathEscapeError as exc:
            out["problems"].append(str(exc))
            continue
        entry: dict = {"path": os.path.relpath(folder, real_root), "link": None}
        declared = os.path.join(real_root, rel or ".")
        if os.path.islink(declared):  # an upgraded service: its path is a link to releases/<v>/<name>
            entry["link"] = {"path": os.path.relpath(declared, real_root), "target": os.readlink(declared)}
        out["services"][name] = entry
    for name, rel in sqlite:
        try:
            out["sqlite"][name] = str(paths.resolve_strictly_inside(rel, real_root, what="SQLite path"))
        except paths.PathEscapeError as exc:
            out["problems"].append(str(exc))
    return out


def check_facts(customers_root: str, root: str, others: list[str], services: list[list[str]],
                sqlite: list[list[str]], run_as: str) -> dict:
    """A customer check's host-side half (customers.remote_check): backup_facts, then what check() looks at
    locally, with the host's users and files: each service folder exists; the run_as user exists there (not root,
    not the SSH login user, which is Kasa's there), may enter the root, and others may not read it; the root
    follows the ownership model (engines.ownership, Kasa's uid being the login user's); each SQLite file opens
    read-only. Returns backup_facts' dict plus "missing" (service names), "run_as" (problem or facts),
    "ownership" (problems) and "sqlite_probe" ({name: version or {"error": …}})."""
    out = backup_facts(customers_root, root, others, services, sqlite)
    out.update(missing=[], run_as=None, ownership=[], sqlite_probe={})
    if out["problems"]:
        return out
    real_root = Path(out["root"])
    out["missing"] = [name for name, entry in out["services"].items()
                      if not os.path.isdir(os.path.join(real_root, entry["path"]))]
    identity = None
    if run_as:
        try:
            identity = runas.lookup(run_as)
        except runas.RunAsError as exc:
            out["run_as"] = {"error": str(exc)}
        else:
            entry: dict = {"uid": identity.uid}
            mode = real_root.stat().st_mode & 0o777
            if not runas.may_access(real_root, identity, os.R_OK | os.X_OK):
                entry["error"] = (f"{identity} cannot enter the root folder {real_root} (each folder above it needs "
                                  "x for that user, the root itself r and x)")
            elif mode & 0o006:
                entry["error"] = (f"the root folder {real_root} is open to every user (mode {mode:04o}): chmod o-rwx "
                                  "it, so other customers' users cannot read it")
            out["run_as"] = entry
    out["ownership"] = ownership.problems(real_root, identity=identity, services=[(n, p) for n, p in services])
    for name, path in out["sqlite"].items():
        try:
            res = dbprobe.probe_sqlite(path)
            out["sqlite_probe"][name] = {"server_version": res.server_version, "client_version": res.client_version}
        except dbprobe.ProbeError as exc:
            out["sqlite_probe"][name] = {"error": str(exc)}
    return out


def private_copy_dir() -> str:
    """A new 0700 folder for one SQLite copy: /var/tmp (a disk, not a tmpfs in RAM) when there is one."""
    base = "/var/tmp" if os.path.isdir("/var/tmp") else None
    return tempfile.mkdtemp(prefix=COPY_PREFIX, dir=base)


def remove_copy_dir(path: str) -> bool:
    """Remove a folder private_copy_dir() made (and only such a folder)."""
    if not os.path.basename(path.rstrip("/")).startswith(COPY_PREFIX) or os.path.islink(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


def sweep_copy_dirs(max_age: float = COPY_MAX_AGE) -> list[str]:
    """Remove private copies older than `max_age` seconds that this user left (a backup whose host went away
    while it streamed, and which could not remove its copy then): the next backup on the host removes them."""
    removed = []
    for base in {"/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir(), tempfile.gettempdir()}:
        with contextlib.suppress(OSError):
            for entry in os.scandir(base):
                if not entry.name.startswith(COPY_PREFIX):
                    continue
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if entry.is_dir(follow_symlinks=False) and st.st_uid == os.geteuid() \
                            and time.time() - st.st_mtime > max_age:
                        shutil.rmtree(entry.path, ignore_errors=True)
                        removed.append(entry.path)
    return removed
