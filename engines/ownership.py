"""Who owns what in a customer's root (README, "Security model"): the model, what breaks it, and setting it up.

Kasa's worker (root in production) works in each customer's root: it creates the restore's staging folder, trash
folders, releases/, releases/<version>/ and the service paths' release links there, and renames and removes
what is in them. The customer's OS user (`run_as`), whose code runs in that root, must not be able to rename or
replace any of that, so:

- the root itself belongs to the worker's user, its group is the customer's user's (primary) group, mode 0750:
  that user may enter and read it, not change it, and nobody else may look in;
- the folders Kasa creates there are the worker's: releases/ and releases/<version>/ and the folders above a
  nested service path (0755: the user passes through; others cannot reach the root anyway), the staging folder
  of a restore (0700);
- each service folder, and everything in it, belongs to the customer's user, who runs its code there (restores
  unpack as that user, upgrades give it each release folder); so do its PM2 home (.kasa-pm2) and Kasa's
  ecosystem file in the root, and the config files at the root (which it may change, not replace). An SQLite
  database lives in a service folder, where its user may create the -wal and -shm files beside it.

A root that does not follow the model is reported by customer_check (`problems`); Kasa never trusts one that
does either: every change below a root goes through descriptors that follow no link the user could have made
(engines.beneath). Plain Python, no Django.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from . import beneath, runas

ROOT_MODE = 0o750
KASA_DIR_MODE = 0o755
RELEASES = "releases"  # engines.layout.RELEASES (layout imports trees, which imports beneath: no cycle here)


def kasa_folders(root: str | os.PathLike, service_paths: Iterable[str]) -> list[str]:
    """The folders below the root that must be Kasa's (relative): those above each nested service folder,
    releases/ and each releases/<version>/ present now."""
    root = Path(root)
    found: dict[str, None] = {}
    for rel in service_paths:
        comps = [c for c in (rel or "").split("/") if c not in ("", ".")]
        for i in range(1, len(comps)):
            found["/".join(comps[:i])] = None
    if beneath.is_dir(root, root / RELEASES):
        found[RELEASES] = None
        for name in sorted(beneath.listdir(root, root / RELEASES)):
            path = root / RELEASES / name  # a version folder (a link there is reported, never followed)
            if not name.startswith(".") and (beneath.is_dir(root, path) or beneath.is_link(root, path)):
                found[f"{RELEASES}/{name}"] = None
    return list(found)


def problems(root: str | os.PathLike, *, identity: runas.Identity | None, services: Iterable[tuple[str, str]],
             kasa_uid: int | None = None) -> list[str]:
    """How the root breaks the model, one sentence each ([] when it follows it). `services`: (name, path)."""
    root = Path(root)
    kasa_uid = os.geteuid() if kasa_uid is None else kasa_uid
    services = list(services)
    out: list[str] = []
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return out  # the check's root item says so
    if stat.S_ISLNK(st.st_mode):
        return [f"the root folder {root} is a symbolic link"]
    group = f":{identity.gid}" if identity is not None else ""
    if st.st_uid != kasa_uid:
        out.append(f"the root folder {root} belongs to uid {st.st_uid}, not to Kasa's worker (uid {kasa_uid}): "
                   f"the customer's user could rename or replace what Kasa makes there (chown {kasa_uid}{group} "
                   f"and chmod {ROOT_MODE:o} it; its services' folders stay the user's)")
    if stat.S_IMODE(st.st_mode) & 0o022:
        out.append(f"the root folder {root} may be written by its group or others (mode "
                   f"{stat.S_IMODE(st.st_mode):04o}): chmod {ROOT_MODE:o} it")
    try:
        folders = kasa_folders(root, [p for _n, p in services])
    except beneath.BeneathError as exc:
        return [*out, str(exc)]
    for rel in folders:
        try:
            fst = beneath.lstat(root, root / rel)
        except beneath.BeneathError as exc:
            out.append(str(exc))
            continue
        if fst is None:
            continue
        if stat.S_ISLNK(fst.st_mode):
            out.append(f"{root / rel} is a symbolic link, where Kasa keeps a folder of its own")
        elif fst.st_uid != kasa_uid:
            out.append(f"{root / rel} belongs to uid {fst.st_uid}, not to Kasa's worker (uid {kasa_uid}): the "
                       f"customer's user could rename what Kasa switches or removes there (chown {kasa_uid} and "
                       f"chmod {KASA_DIR_MODE:o} it)")
        elif stat.S_IMODE(fst.st_mode) & 0o022:
            out.append(f"{root / rel} may be written by its group or others (mode "
                       f"{stat.S_IMODE(fst.st_mode):04o}): chmod {KASA_DIR_MODE:o} it")
    if identity is not None:
        out += _service_problems(root, identity, services, kasa_uid)
    return out


def _service_problems(root: Path, identity: runas.Identity, services: list[tuple[str, str]],
                      kasa_uid: int) -> list[str]:
    out = []
    for name, rel in services:
        rel = (rel or "").strip("/")
        if rel in ("", "."):
            out.append(f"service {name}'s folder is the root itself, which stays Kasa's: give the service a folder "
                       "of its own")
            continue
        try:
            st = beneath.lstat(root, root / rel)
            if st is not None and stat.S_ISLNK(st.st_mode):  # a release link: Kasa's, to the user's folder
                if st.st_uid != kasa_uid:
                    out.append(f"service {name}'s path {root / rel} is a symbolic link that Kasa did not make")
                    continue
                with beneath.folder(root, root / rel) as fd:
                    st = os.fstat(fd)
        except beneath.BeneathError as exc:
            out.append(f"service {name}: {exc}")
            continue
        if st is not None and st.st_uid != identity.uid:
            out.append(f"service {name}'s folder {root / rel} belongs to uid {st.st_uid}, not to {identity.user}, "
                       "whose code runs there")
    return out


def hand_over(root: str | os.PathLike, identity: runas.Identity, *, service_paths: Iterable[str],
              files: Iterable[str] = ()) -> None:
    """Set a root up by the model (as root): the root the worker's, group the user's, 0750; the folders above
    nested service folders, releases/ and releases/<version>/ the worker's, 0755; each service folder (with
    everything in it) and each of `files` (relative: the ecosystem file, config files at the root) the user's.
    Through descriptors (engines.beneath)."""
    root = Path(root)
    service_paths = list(service_paths)
    with beneath.folder(root) as fd:
        os.fchown(fd, os.geteuid(), identity.gid)
        os.fchmod(fd, ROOT_MODE)
    for rel in service_paths:
        comps = [c for c in (rel or "").split("/") if c not in ("", ".")]
        if len(comps) > 1:
            beneath.makedirs(root, root.joinpath(*comps[:-1]), mode=KASA_DIR_MODE)
    for rel in kasa_folders(root, service_paths):
        st = beneath.lstat(root, root / rel)
        if st is None or not stat.S_ISDIR(st.st_mode):
            continue  # not a folder (a link the user made, say): customer_check reports it
        with beneath.folder(root, root / rel) as fd:
            os.fchown(fd, os.geteuid(), os.getegid())
            os.fchmod(fd, KASA_DIR_MODE)
    for rel in service_paths:
        comps = [c for c in (rel or "").split("/") if c not in ("", ".")]
        if not comps:
            continue
        st = beneath.lstat(root, root.joinpath(*comps))
        if st is not None and not stat.S_ISLNK(st.st_mode):  # a release link stays Kasa's (its folder is given)
            beneath.chown(root, root.joinpath(*comps), identity.uid, identity.gid, recursive=True)
    for rel in files:
        if beneath.lexists(root, root / rel):
            beneath.chown(root, root / rel, identity.uid, identity.gid)
