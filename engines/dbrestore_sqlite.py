"""SQLite: write a database copy beside the live file, swap it in for the live one, swap it back.

The engine-neutral parts (DbTarget, side names) are in engines.dbbase, RestoreError in engines.dberrors;
engines.dbrestore re-exports the public functions here, and its docstring tells the whole procedure
(privileges included).

The live file lives in a customer's folder, which the customer's OS user may change while Kasa's worker (root)
works there. Every file of a swap (the live file, its side files, the new and old copies) lies in that one
folder: it is opened once — with `root`, from the customer's root without following a link (engines.beneath) —
and every link, rename and unlink is made in its descriptor. The copy is checked by SQLite through
/proc/self/fd/<its descriptor>, read-only: the name Kasa wrote cannot be swapped under it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from collections.abc import Iterable, Iterator

from . import beneath
from .dbbase import drop_after_failure, new_tag
from .dberrors import RestoreError
from .feed import oneline as _oneline

# --- SQLite ------------------------------------------------------------------------------
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")  # they belong to the main file: they move with it


def _sqlite_side_path(live_path: str, kind: str, tag: str | None) -> str:
    folder, base = os.path.split(os.path.abspath(live_path))
    return os.path.join(folder, f".{base}.kasa-{kind}-{tag or new_tag()}")


@contextlib.contextmanager
def _folder(live_path: str, root) -> Iterator[int]:
    """The descriptor of the live file's folder (with `root`: reached from it without following a link)."""
    folder = os.path.dirname(os.path.abspath(live_path))
    if root:
        fd = beneath.open_dir(root, folder)
    else:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _fsync_dir(fd: int) -> None:
    beneath.fsync(fd)


def _name(path: str, live_path: str) -> str:
    """The name of a side path in the live file's folder (every name of a swap lives there)."""
    path = os.path.abspath(path)
    if os.path.dirname(path) != os.path.dirname(os.path.abspath(live_path)):
        raise RestoreError(f"{path} is not beside {live_path}; nothing was changed")
    return os.path.basename(path)


def _exists(fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _is_file(fd: int, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _remove_at(fd: int, name: str) -> None:
    for n in (name, *(name + s for s in SQLITE_SIDE_FILES)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(n, dir_fd=fd)


def sqlite_remove(path: str, root=None) -> None:
    try:
        with _folder(path, root) as fd:
            _remove_at(fd, os.path.basename(path))
    except (FileNotFoundError, NotADirectoryError):
        pass


def sqlite_row_counts(path: str, *, fd: int | None = None) -> dict[str, int]:
    """`PRAGMA integrity_check` must say ok; then rows per table, keyed like sources.sqlite_online_copy. With
    `fd` (the file, open), SQLite reads that very file, read-only, whatever its name leads to now."""
    where = f"/proc/self/fd/{fd}" if fd is not None else path
    with open(where, "rb") as fh:
        if fh.read(16) != b"SQLite format 3\x00":
            raise RestoreError(f"{os.path.basename(path)} is not an SQLite database (bad header)")
    try:
        con = sqlite3.connect(f"file:{where}?mode=ro", uri=True, timeout=5) if fd is not None else \
            sqlite3.connect(path, timeout=5)
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


def sqlite_restore_fresh(live_path: str, chunks: Iterable[bytes], *, tag: str | None = None, root=None
                         ) -> tuple[str, dict[str, int]]:
    """Write the database copy beside the live file under a hidden name, fsync, check; return (path, counts).

    The new file takes the live file's mode and owner (when we may set them), so
    the application can still write it once swapped in. A missing live file is
    fine (a clone to a new place). On failure the new file is removed.
    """
    live_path = os.path.abspath(live_path)
    folder = os.path.dirname(live_path)
    new_path = _sqlite_side_path(live_path, "new", tag)
    live, new = os.path.basename(live_path), os.path.basename(new_path)
    try:
        dfd = beneath.open_dir(root, folder) if root else os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise RestoreError(f"folder {folder} does not exist; nothing was changed") from None
    try:
        ref = os.stat(live, dir_fd=dfd, follow_symlinks=False) if _is_file(dfd, live) else None
        try:
            fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                with os.fdopen(fd, "wb", closefd=False) as fh:
                    for chunk in chunks:
                        fh.write(chunk)
                    fh.flush()
                os.fsync(fd)
                counts = sqlite_row_counts(new_path, fd=fd)
                for side in SQLITE_SIDE_FILES:  # a clean close leaves none; one left over must not follow it to live
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(new + side, dir_fd=dfd)
                owner_of = ref or os.fstat(dfd)
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, owner_of.st_uid, owner_of.st_gid)
                if ref:
                    os.fchmod(fd, ref.st_mode & 0o7777)
            finally:
                os.close(fd)
            _fsync_dir(dfd)
            return new_path, counts
        except BaseException as exc:
            drop_after_failure(lambda: _remove_at(dfd, new), exc, new, live_path)
            raise
    finally:
        os.close(dfd)


def _sqlite_set_aside(fd: int, live: str, aside: str, undo: list) -> bool:
    """Give the live file a second name (a hard link: live never vanishes) and move its side files with it.

    Returns whether the main file was linked; if not (a filesystem without hard
    links) it was renamed, and live is missing until the caller replaces it.
    """
    try:
        os.link(live, aside, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
        undo.append(lambda: os.unlink(aside, dir_fd=fd))
        linked = True
    except OSError:
        os.rename(live, aside, src_dir_fd=fd, dst_dir_fd=fd)
        undo.append(lambda: os.rename(aside, live, src_dir_fd=fd, dst_dir_fd=fd))
        linked = False
    for side in SQLITE_SIDE_FILES:
        if _exists(fd, live + side):
            os.rename(live + side, aside + side, src_dir_fd=fd, dst_dir_fd=fd)
            undo.append(lambda s=side: os.rename(aside + s, live + s, src_dir_fd=fd, dst_dir_fd=fd))
    return linked


def _sqlite_undo(undo: list, exc: BaseException, what: str) -> None:
    for step in reversed(undo):
        with contextlib.suppress(OSError):
            step()
    raise RestoreError(f"{what} failed: {_oneline(exc)}; every file was put back") from exc


def sqlite_swap(live_path: str, new_path: str, *, tag: str | None = None, root=None) -> str | None:
    """Move the live file and its -wal/-shm aside (no checkpoint, no open), rename the new one in.

    Returns the old file's path, or None when there was no live file.
    """
    live_path = os.path.abspath(live_path)
    live, new = os.path.basename(live_path), _name(new_path, live_path)
    with _folder(live_path, root) as fd:
        if not _is_file(fd, new):
            raise RestoreError(f"{new_path} does not exist: nothing to swap in; {live_path} was not touched")
        old = _sqlite_side_path(live_path, "old", tag) if _exists(fd, live) else None
        undo: list = []
        try:
            if old:
                _sqlite_set_aside(fd, live, os.path.basename(old), undo)
            os.replace(new, live, src_dir_fd=fd, dst_dir_fd=fd)
        except OSError as exc:
            _sqlite_undo(undo, exc, f"swapping {live_path}")
        _fsync_dir(fd)
    return old


def sqlite_repair(live_path: str, new_path: str, *, tag: str, root=None) -> str | None:
    """After a worker died inside sqlite_swap(live_path, new_path, tag=tag): put back what the half-done swap
    had moved, and tell how far it got (from what exists: the swap's names are fixed by its tag).

    Returns None when the previous file is live (the rename never ran; its second name and any moved -wal/-shm
    file were put back here). Otherwise the restored file is live, and the return value is where the previous
    one is kept ("" when there was none), for sqlite_unswap as after a completed swap.
    """
    live_path = os.path.abspath(live_path)
    old_path = _sqlite_side_path(live_path, "old", tag)
    live, old, new = os.path.basename(live_path), os.path.basename(old_path), _name(new_path, live_path)
    with _folder(live_path, root) as fd:
        if not _exists(fd, new):  # the rename ran: the restored file is live
            return old_path if _is_file(fd, old) else ""
        if _exists(fd, old):
            if _exists(fd, live):
                os.unlink(old, dir_fd=fd)  # the live file's second name (its hard link)
            else:
                os.rename(old, live, src_dir_fd=fd, dst_dir_fd=fd)  # renamed aside, on a filesystem without links
        for side in SQLITE_SIDE_FILES:
            if _exists(fd, old + side) and not _exists(fd, live + side):
                os.rename(old + side, live + side, src_dir_fd=fd, dst_dir_fd=fd)
        _fsync_dir(fd)
    return None


def sqlite_unswap(live_path: str, old_path: str | None, new_path: str | None = None, *, root=None) -> str:
    """Undo sqlite_swap: the restored file (and side files) go to new_path, old_path is live again.

    Returns where the restored file was kept. old_path None: there was no live
    file before the swap, so there is none after.
    """
    live_path = os.path.abspath(live_path)
    keep_path = new_path or _sqlite_side_path(live_path, "new", None)
    live, keep = os.path.basename(live_path), _name(keep_path, live_path)
    old = _name(old_path, live_path) if old_path else None
    with _folder(live_path, root) as fd:
        if _exists(fd, keep):
            raise RestoreError(f"{keep_path} already exists; {live_path} was not touched")
        if old and not _is_file(fd, old):
            raise RestoreError(f"{old_path} does not exist: nothing to swap back; {live_path} was not touched")
        undo: list = []
        try:
            linked = _sqlite_set_aside(fd, live, keep, undo) if _exists(fd, live) else False
            if old:
                for side in SQLITE_SIDE_FILES:
                    if _exists(fd, old + side):
                        os.rename(old + side, live + side, src_dir_fd=fd, dst_dir_fd=fd)
                        undo.append(lambda s=side: os.rename(live + s, old + s, src_dir_fd=fd, dst_dir_fd=fd))
                os.replace(old, live, src_dir_fd=fd, dst_dir_fd=fd)
            elif linked:
                os.unlink(live, dir_fd=fd)
        except OSError as exc:
            _sqlite_undo(undo, exc, f"swapping {live_path} back")
        _fsync_dir(fd)
    return keep_path
