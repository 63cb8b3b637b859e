"""Swap a staged folder or file with the live one, and undo it.

Linux's renameat2(RENAME_EXCHANGE) swaps two paths in one atomic step: a
reader sees the old tree or the new one, never a gap, and the old tree lands
exactly where the staged one was, ready for an undo. Where the filesystem does
not support it (EINVAL) we fall back to two renames, which leave a window of
a few microseconds with no live path but are still undone exactly.

Every swap is described by a small JSON-able dict (`plan`) that the caller
stores in its journal before doing it (`apply`): a worker killed at any point
leaves a journal that another process can undo exactly (`undo`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

AT_FDCWD = -100
RENAME_EXCHANGE = 1 << 1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


class SwapError(OSError):
    pass


def exchange(a: str, b: str) -> bool:
    """Atomically exchange two existing paths. False when the filesystem cannot (caller falls back)."""
    if _renameat2 is None:
        return False
    res = _renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise SwapError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def plan(live: str, staged: str) -> dict:
    """The journal step for swapping `staged` into `live`: record it BEFORE calling `apply`.

    Inode numbers tell `undo` afterwards which tree is where, so a process killed
    at any point (before, during or after the swap) is undone exactly.
    """
    return {"live": live, "staged": staged, "live_ino": _ino(live), "staged_ino": _ino(staged)}


def apply(step: dict) -> None:
    """Swap: the staged tree becomes live; the previous live tree ends at the staged path."""
    live, staged = step["live"], step["staged"]
    if step["live_ino"] is None:
        os.rename(staged, live)
    elif not exchange(live, staged):
        tmp = staged + ".live"
        os.rename(live, tmp)
        try:
            os.rename(staged, live)
        except OSError:
            os.rename(tmp, live)
            raise
        os.rename(tmp, staged)
    _fsync_parent(live)
    _fsync_parent(staged)


def undo(step: dict) -> bool:
    """Put the previous live tree back at the live path. Idempotent; True when something moved."""
    live, staged = step["live"], step["staged"]
    live_ino, staged_ino = step["live_ino"], step["staged_ino"]
    tmp = staged + ".live"
    where = {}
    for path in (live, staged, tmp):
        ino = _ino(path)
        if ino is not None:
            where[ino] = path
    if live_ino is None:  # there was nothing live: take the restored tree away again
        if where.get(staged_ino) == live:
            os.rename(live, staged)
            _fsync_parent(live)
            return True
        return False
    if where.get(live_ino) == live:
        return False  # never swapped (or already undone)
    if where.get(live_ino) == staged and where.get(staged_ino) == live:
        if not exchange(live, staged):
            os.rename(live, tmp + ".new")
            os.rename(staged, live)
            os.rename(tmp + ".new", staged)
    elif where.get(live_ino) == tmp:  # killed inside the two-rename fallback
        if where.get(staged_ino) == live:
            os.rename(live, staged)
        os.rename(tmp, live)
    else:
        raise SwapError(errno.ENOENT, f"cannot undo the swap of {live}: the previous tree is not where the "
                                      f"journal says (looked at {live}, {staged}, {tmp})")
    _fsync_parent(live)
    return True


def _ino(path: str) -> int | None:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None


def _fsync_parent(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
