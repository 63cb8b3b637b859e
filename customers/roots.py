"""Customer folders never overlap: each customer's root is its own, and none reaches Kasa's own files.

A root that equals, contains or lies inside another customer's root would let
one team back up, download, restore over or upgrade another team's files. The
comparison is between resolved real paths (symbolic links followed), so a link
to another customer's folder is caught as well as the folder itself.

Checked twice: when a root is set (model validation: `customer_add`, the
admin, `backup_import`; `restore --to-root`), and again by
`customers.operations.guard`, which every mutating run passes right before its
handler (operations.registry guards), because a folder can be swapped for a
link on disk after it was validated.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from django.conf import settings

from engines import paths


def real(path: str | os.PathLike) -> Path:
    """The path with every symbolic link followed (what the kernel would open today); need not exist."""
    return Path(os.path.realpath(os.fspath(path)))


overlap = paths.overlap  # the same rule on the hosts (engines.hostside)


def trash_dir() -> Path:
    """Kasa's trash folder: beside the customers' roots, on their filesystem (moving a tree there out of a
    customer's root is one rename; engines.trees.discard), and inside none of them (kasa_own_paths)."""
    return settings.KASA_CUSTOMERS_ROOT / ".kasa-trash"


def kasa_own_paths() -> list[tuple[str, Path]]:
    """Kasa's own folders and files, which no customer folder may be, hold or lie in."""
    own = [("KASA_VAR_DIR", settings.KASA_VAR_DIR), ("Kasa's trash folder", trash_dir())]
    for name in ("KASA_BACKUP_DIR", "KASA_SCRATCH_DIR", "KASA_STORAGE_DIR", "STATIC_ROOT"):
        if getattr(settings, name, None):
            own.append((name, Path(getattr(settings, name))))
    db = settings.DATABASES["default"]
    if db["ENGINE"] == "django.db.backends.sqlite3" and str(db.get("NAME", "")).startswith("/"):
        own.append(("the control database", Path(db["NAME"])))
    return own


def kasa_conflict(raw: str | os.PathLike, *, what: str) -> str | None:
    mine = real(raw)
    for label, path in kasa_own_paths():
        theirs = real(path)
        how = overlap(mine, theirs)
        if how:
            return f"{what} {os.fspath(raw)!r} {how} {label} ({theirs}), which is Kasa's own and never a customer's"
    return None


def root_conflict(raw: str | os.PathLike, others: Iterable[str], *, what: str = "root folder") -> str | None:
    """Why `raw` may not be a customer's root (or a copy's folder), or None. `others`: the other customers'
    roots (not the one whose root this is). The other customer is not named: whoever sets a root may not be
    allowed to know it."""
    if problem := kasa_conflict(raw, what=what):
        return problem
    mine = real(raw)
    shown = os.fspath(raw) if str(mine) == os.path.normpath(os.fspath(raw)) else f"{os.fspath(raw)} (really {mine})"
    for other_root in others:
        how = overlap(mine, real(other_root))
        if how:
            return f"{what} {shown} {how} another customer's root folder: each customer's folder is its own"
    return None


def copy_root_problem(raw: str, roots: Iterable[str]) -> str | None:
    """A copy (restore --to-root) goes into a folder of its own: inside KASA_CUSTOMERS_ROOT, overlapping no
    customer's root (`roots`: every customer's, its own customer's included) and none of Kasa's files."""
    try:
        paths.resolve_strictly_inside(raw, settings.KASA_CUSTOMERS_ROOT, what="--to-root")
    except paths.PathEscapeError as exc:
        return f"{exc} (KASA_CUSTOMERS_ROOT)"
    return root_conflict(raw, roots, what="--to-root")


def move_root_problem(raw: str, roots: Iterable[str]) -> str | None:
    """A customer moved onto `local` lands in a new folder of its own (backups.move_local): Customer.clean's rules
    for a root on `local` (strictly inside KASA_CUSTOMERS_ROOT with links followed, overlapping none of `roots` —
    the customers of `local` — and none of Kasa's files), and nothing there yet: a move never lands in a folder
    that exists (two moves racing for one path: only one mkdir wins)."""
    try:
        paths.resolve_strictly_inside(raw, settings.KASA_CUSTOMERS_ROOT, what="root folder")
    except paths.PathEscapeError as exc:
        return f"{exc} (KASA_CUSTOMERS_ROOT)"
    if problem := root_conflict(raw, roots):
        return problem
    if os.path.lexists(raw):
        return f"{raw} exists already on the worker's machine (`local`): a customer moves only into a new folder"
    return None
