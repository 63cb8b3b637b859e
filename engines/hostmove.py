"""The host's side of a customer's move to this host (backups.move), and of a copy restored on it
(backups.remote_copy): run here through engines.hostcall by the SSH login user, standard library only.

- `root_check`: whether a new root may be made here (inside the customers root, not the root itself, overlapping
  no other customer's root of this host, absent or an empty folder); the worker refuses on any problem before
  anything is made.
- `make_root`: the new root, exactly as Kasa's ownership model wants a customer's root: the login user's (Kasa's),
  group the customer's user's, 0750, so that user may enter it but not rename what Kasa makes there. For a copy, an
  empty folder that was there already is used (and said so: the undo then empties it and leaves it); a move wants
  a new one.
- `make_folder`: a folder below the root given to the customer's user (the folder of a SQLite database that no
  restored tree brings: the application writes beside its file, journal and WAL).
- `remove_root`: the undo of make_root, and a confirmed move's removal of the old copy: the PM2 daemon whose home
  is in that root stopped first (as its user, else its sockets would vanish under it), then the tree removed
  without following a link.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import beneath, paths, pm2, runas, trees


def root_check(customers_root: str, root: str, others: list[str], existing_ok: bool = True) -> list[str]:
    """What stops `root` from becoming a customer's root here: [] when it may. `existing_ok`: an empty folder
    may be used (a copy, as locally); a move wants none (two moves racing for one path: only one mkdir wins)."""
    try:
        real = paths.resolve_strictly_inside(root, customers_root, what="root folder")
    except paths.PathEscapeError as exc:
        return [f"{exc} (the host's customers root)"]
    for other in others:
        if how := paths.overlap(real, Path(os.path.realpath(other))):
            return [f"root folder {root} {how} another customer's root folder on this host: each customer's folder "
                    "is its own"]
    if os.path.lexists(root):
        if not existing_ok:
            return [f"{root} exists already on this host: a customer moves only into a new folder"]
        if os.path.islink(root) or not os.path.isdir(root):
            return [f"{root} exists and is not a folder"]
        if os.listdir(root):
            return [f"{root} exists and is not empty: a move or a copy lands only in an empty or new folder"]
    return []


def make_root(customers_root: str, root: str, gid: int, mode: int = 0o750, existing_ok: bool = True) -> bool:
    """The root made (True), or an empty folder that was there kept (False, only when `existing_ok`); its owner
    and mode set either way. FileExistsError when the name is taken meanwhile (mkdir is the arbiter)."""
    rel = os.path.relpath(root, customers_root)
    if rel.startswith("..") or rel == ".":
        raise OSError(f"{root} is not inside {customers_root}")
    made = not existing_ok or not beneath.lexists(customers_root, root)
    if made:
        parent = os.path.dirname(root)
        if parent != os.path.normpath(customers_root):
            beneath.makedirs(customers_root, parent, mode=0o755)
        beneath.mkdir(customers_root, root, mode=mode)
    elif beneath.listdir(customers_root, root):
        raise OSError(f"{root} is not empty")
    with beneath.folder(customers_root, root) as fd:
        if os.geteuid() == 0:
            os.fchown(fd, 0, gid)
        os.fchmod(fd, mode)
    return made


def make_folder(root: str, path: str, uid: int, gid: int) -> None:
    """`path` (below `root`) and any missing folder above it, the new ones the customer's user's (0750)."""
    rel = os.path.relpath(path, root)
    if rel.startswith("..") or rel == ".":
        raise OSError(f"{path} is not below {root}")
    current = root
    for name in rel.split("/"):
        current = os.path.join(current, name)
        if beneath.lexists(root, current):
            if not beneath.is_dir(root, current):
                raise OSError(f"{current} is not a folder")
            continue
        beneath.mkdir(root, current, mode=0o750)
        if os.geteuid() == 0:
            beneath.chown(root, current, uid, gid)


def remove_root(customers_root: str, root: str, run_as: str = "", pm2_binary: str = "") -> bool:
    """The customer's copy at `root` gone: its PM2 daemon stopped, its tree removed. False when there was none."""
    try:
        real = paths.resolve_strictly_inside(root, customers_root, what="root folder")
    except paths.PathEscapeError as exc:
        raise OSError(f"{exc} (the host's customers root)") from None
    if not os.path.lexists(real):
        return False
    home = pm2.pm2_home_for(real)
    if os.path.isdir(home):
        who = runas.lookup(run_as) if run_as else None
        try:
            pm2.pm2_kill(home, identity=who, **({"binary": pm2_binary} if pm2_binary else {}))
        except Exception:  # noqa: BLE001 — a daemon that will not stop must not keep the folder; killed with it
            pass
    trees.remove_tree(str(real), root=customers_root)
    return True


def empty_root(customers_root: str, root: str, gid: int, run_as: str = "", pm2_binary: str = "") -> None:
    """The undo of make_root on a folder that was there, empty, before: emptied again (as removed, then made)."""
    remove_root(customers_root, root, run_as, pm2_binary)
    make_root(customers_root, root, gid)
