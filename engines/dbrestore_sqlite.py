"""SQLite: write a database copy beside the live file, swap it in for the live one, swap it back.

The engine-neutral parts (DbTarget, RestoreError, side names, the privileges each
engine needs) are in engines.dbrestore, which re-exports the public functions
here; see its docstring for the whole procedure.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable

from .dbrestore import RestoreError, _drop_after_failure, new_tag
from .feed import oneline as _oneline

# --- SQLite ------------------------------------------------------------------------------
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")  # they belong to the main file: they move with it


def _sqlite_side_path(live_path: str, kind: str, tag: str | None) -> str:
    folder, base = os.path.split(os.path.abspath(live_path))
    return os.path.join(folder, f".{base}.kasa-{kind}-{tag or new_tag()}")


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sqlite_remove(path: str) -> None:
    for p in (path, *(path + s for s in SQLITE_SIDE_FILES)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def sqlite_row_counts(path: str) -> dict[str, int]:
    """`PRAGMA integrity_check` must say ok; then rows per table, keyed like sources.sqlite_online_copy."""
    with open(path, "rb") as fh:
        if fh.read(16) != b"SQLite format 3\x00":
            raise RestoreError(f"{os.path.basename(path)} is not an SQLite database (bad header)")
    try:
        con = sqlite3.connect(path, timeout=5)
        try:
            result = [r[0] for r in con.execute("PRAGMA integrity_check")]
            if result != ["ok"]:
                raise RestoreError(f"the restored SQLite file fails its integrity check: {'; '.join(result[:3])}")
            tables = [r[0] for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
            return {t: con.execute(f'SELECT count(*) FROM "{t.replace(chr(34), chr(34) * 2)}"').fetchone()[0]
                    for t in tables}
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise RestoreError(f"the restored SQLite file is not readable: {exc}") from None


def sqlite_restore_fresh(live_path: str, chunks: Iterable[bytes], *, tag: str | None = None
                         ) -> tuple[str, dict[str, int]]:
    """Write the database copy beside the live file under a hidden name, fsync, check; return (path, counts).

    The new file takes the live file's mode and owner (when we may set them), so
    the application can still write it once swapped in. A missing live file is
    fine (a clone to a new place). On failure the new file is removed.
    """
    live_path = os.path.abspath(live_path)
    folder = os.path.dirname(live_path)
    if not os.path.isdir(folder):
        raise RestoreError(f"folder {folder} does not exist; nothing was changed")
    new_path = _sqlite_side_path(live_path, "new", tag)
    ref = os.stat(live_path) if os.path.exists(live_path) else None
    try:
        fd = os.open(new_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        counts = sqlite_row_counts(new_path)
        for side in SQLITE_SIDE_FILES:  # a clean close leaves none; one left over must not follow it to live
            with contextlib.suppress(FileNotFoundError):
                os.unlink(new_path + side)
        owner_of = ref or os.stat(folder)
        with contextlib.suppress(PermissionError):
            os.chown(new_path, owner_of.st_uid, owner_of.st_gid)
        if ref:
            os.chmod(new_path, ref.st_mode & 0o7777)
        _fsync_dir(folder)
        return new_path, counts
    except BaseException as exc:
        _drop_after_failure(lambda: _sqlite_remove(new_path), exc, os.path.basename(new_path), live_path)
        raise


def _sqlite_set_aside(live_path: str, aside: str, undo: list) -> bool:
    """Give the live file a second name (a hard link: live never vanishes) and move its side files with it.

    Returns whether the main file was linked; if not (a filesystem without hard
    links) it was renamed, and live is missing until the caller replaces it.
    """
    try:
        os.link(live_path, aside)
        undo.append(lambda: os.unlink(aside))
        linked = True
    except OSError:
        os.rename(live_path, aside)
        undo.append(lambda: os.rename(aside, live_path))
        linked = False
    for side in SQLITE_SIDE_FILES:
        if os.path.exists(live_path + side):
            os.rename(live_path + side, aside + side)
            undo.append(lambda s=side: os.rename(aside + s, live_path + s))
    return linked


def _sqlite_undo(undo: list, exc: BaseException, what: str) -> None:
    for step in reversed(undo):
        with contextlib.suppress(OSError):
            step()
    raise RestoreError(f"{what} failed: {_oneline(exc)}; every file was put back") from exc


def sqlite_swap(live_path: str, new_path: str, *, tag: str | None = None) -> str | None:
    """Move the live file and its -wal/-shm aside (no checkpoint, no open), os.replace the new one in.

    Returns the old file's path, or None when there was no live file.
    """
    live_path = os.path.abspath(live_path)
    if not os.path.isfile(new_path):
        raise RestoreError(f"{new_path} does not exist: nothing to swap in; {live_path} was not touched")
    old = _sqlite_side_path(live_path, "old", tag) if os.path.exists(live_path) else None
    undo: list = []
    try:
        if old:
            _sqlite_set_aside(live_path, old, undo)
        os.replace(new_path, live_path)
    except OSError as exc:
        _sqlite_undo(undo, exc, f"swapping {live_path}")
    _fsync_dir(os.path.dirname(live_path))
    return old


def sqlite_repair(live_path: str, new_path: str, *, tag: str) -> str | None:
    """After a worker died inside sqlite_swap(live_path, new_path, tag=tag): put back what the half-done swap
    had moved, and tell how far it got (from what exists: the swap's names are fixed by its tag).

    Returns None when the previous file is live (os.replace never ran; its second name and any moved -wal/-shm
    file were put back here). Otherwise the restored file is live, and the return value is where the previous
    one is kept ("" when there was none), for sqlite_unswap as after a completed swap.
    """
    live_path = os.path.abspath(live_path)
    old = _sqlite_side_path(live_path, "old", tag)
    if not os.path.exists(new_path):  # os.replace ran: the restored file is live
        return old if os.path.isfile(old) else ""
    if os.path.exists(old):
        if os.path.exists(live_path):
            os.unlink(old)  # the live file's second name (its hard link)
        else:
            os.rename(old, live_path)  # renamed aside, on a filesystem without hard links
    for side in SQLITE_SIDE_FILES:
        if os.path.exists(old + side) and not os.path.exists(live_path + side):
            os.rename(old + side, live_path + side)
    _fsync_dir(os.path.dirname(live_path))
    return None


def sqlite_unswap(live_path: str, old_path: str | None, new_path: str | None = None) -> str:
    """Undo sqlite_swap: the restored file (and side files) go to new_path, old_path is live again.

    Returns where the restored file was kept. old_path None: there was no live
    file before the swap, so there is none after.
    """
    live_path = os.path.abspath(live_path)
    keep = new_path or _sqlite_side_path(live_path, "new", None)
    if os.path.exists(keep):
        raise RestoreError(f"{keep} already exists; {live_path} was not touched")
    if old_path and not os.path.isfile(old_path):
        raise RestoreError(f"{old_path} does not exist: nothing to swap back; {live_path} was not touched")
    undo: list = []
    try:
        linked = _sqlite_set_aside(live_path, keep, undo) if os.path.exists(live_path) else False
        if old_path:
            for side in SQLITE_SIDE_FILES:
                if os.path.exists(old_path + side):
                    os.rename(old_path + side, live_path + side)
                    undo.append(lambda s=side: os.rename(live_path + s, old_path + s))
            os.replace(old_path, live_path)
        elif linked:
            os.unlink(live_path)
    except OSError as exc:
        _sqlite_undo(undo, exc, f"swapping {live_path} back")
    _fsync_dir(os.path.dirname(live_path))
    return keep
