"""Swap a staged folder or file with the live one, and undo it.

Linux's renameat2(RENAME_EXCHANGE) swaps two entries in one atomic step: a
reader sees the old tree or the new one, never a gap, and the old tree lands
exactly where the staged one was, ready for an undo. Where the filesystem does
not support it (EINVAL) we fall back to two renames, which leave a window of
a few microseconds with no live path but are still undone exactly.

Every swap is described by a small JSON-able dict (`plan`) that the caller
stores in its journal before doing it (`apply`): a worker killed at any point
leaves a journal that another process can undo exactly (`undo`).

Both paths lie below `root` (the customer's root, or a copy's), in folders the
customer's user may change: their folders are reached from the root's
descriptor without following any link (engines.beneath), and the renames are
renameat2 on those descriptors. A link in the way raises beneath.LinkRefused
before anything moved; the caller marks that step `refused` (nothing to undo).
"""

from __future__ import annotations

import contextlib
import errno
import os

from . import beneath

RENAME_EXCHANGE = beneath.RENAME_EXCHANGE


class SwapError(OSError):
    pass


def plan(live: str, staged: str, *, root: str | os.PathLike) -> dict:
    """The journal step for swapping `staged` into `live`: record it BEFORE calling `apply`.

    Inode numbers tell `undo` afterwards which tree is where, so a process killed
    at any point (before, during or after the swap) is undone exactly.
    """
    return {"live": live, "staged": staged, "live_ino": _ino(root, live), "staged_ino": _ino(root, staged)}


def apply(step: dict, *, root: str | os.PathLike) -> None:
    """Swap: the staged tree becomes live; the previous live tree ends at the staged path."""
    live, staged = step["live"], step["staged"]
    with beneath.parent(root, live) as (lfd, lname), beneath.parent(root, staged) as (sfd, sname):
        if step["live_ino"] is None:
            os.rename(sname, lname, src_dir_fd=sfd, dst_dir_fd=lfd)
        elif not beneath.exchange_at(lfd, lname, sfd, sname):
            tmp = sname + ".live"
            os.rename(lname, tmp, src_dir_fd=lfd, dst_dir_fd=sfd)
            try:
                os.rename(sname, lname, src_dir_fd=sfd, dst_dir_fd=lfd)
            except OSError:
                os.rename(tmp, lname, src_dir_fd=sfd, dst_dir_fd=lfd)
                raise
            os.rename(tmp, sname, src_dir_fd=sfd, dst_dir_fd=sfd)
        beneath.fsync(lfd)
        beneath.fsync(sfd)


def undo(step: dict, *, root: str | os.PathLike) -> bool:
    """Put the previous live tree back at the live path. Idempotent; True when something moved."""
    if step.get("refused"):
        return False  # refused before anything moved (beneath.LinkRefused)
    live, staged, live_ino = step["live"], step["staged"], step["live_ino"]
    try:
        with beneath.parent(root, live) as (lfd, lname), beneath.parent(root, staged) as (sfd, sname):
            return _undo_at(step, lfd, lname, sfd, sname)
    except (FileNotFoundError, NotADirectoryError):
        if live_ino is None:
            return False  # the folders around them are gone: so is what the swap could have put live
        raise SwapError(errno.ENOENT, f"cannot undo the swap of {live}: the folder of {live} or {staged} is "
                                      "gone") from None


def _undo_at(step: dict, lfd: int, lname: str, sfd: int, sname: str) -> bool:
    live_ino, staged_ino = step["live_ino"], step["staged_ino"]
    tname = sname + ".live"
    where = {}
    for label, fd, name in (("live", lfd, lname), ("staged", sfd, sname), ("tmp", sfd, tname)):
        ino = _ino_at(fd, name)
        if ino is not None:
            where[ino] = label
    if live_ino is None:  # there was nothing live: take the restored tree away again
        if where.get(staged_ino) == "live":
            os.rename(lname, sname, src_dir_fd=lfd, dst_dir_fd=sfd)
            beneath.fsync(lfd)
            return True
        return False
    if where.get(live_ino) == "live":
        return False  # never swapped (or already undone)
    if where.get(live_ino) == "staged" and where.get(staged_ino) == "live":
        if not beneath.exchange_at(lfd, lname, sfd, sname):
            os.rename(lname, tname + ".new", src_dir_fd=lfd, dst_dir_fd=sfd)
            os.rename(sname, lname, src_dir_fd=sfd, dst_dir_fd=lfd)
            os.rename(tname + ".new", sname, src_dir_fd=sfd, dst_dir_fd=sfd)
    elif where.get(live_ino) == "tmp":  # killed inside the two-rename fallback
        if where.get(staged_ino) == "live":
            os.rename(lname, sname, src_dir_fd=lfd, dst_dir_fd=sfd)
        os.rename(tname, lname, src_dir_fd=sfd, dst_dir_fd=lfd)
    else:
        raise SwapError(errno.ENOENT, f"cannot undo the swap of {step['live']}: the previous tree is not where the "
                                      f"journal says (looked at {step['live']}, {step['staged']}, "
                                      f"{step['staged']}.live)")
    beneath.fsync(lfd)
    return True


def exchange(root: str | os.PathLike, a: str, b: str) -> bool:
    """Atomically exchange two existing entries below `root`. False when the filesystem cannot."""
    with beneath.parent(root, a) as (afd, aname), beneath.parent(root, b) as (bfd, bname):
        return beneath.exchange_at(afd, aname, bfd, bname)


def _ino(root, path: str) -> int | None:
    st = beneath.lstat(root, path)
    return None if st is None else st.st_ino


def _ino_at(fd: int, name: str) -> int | None:
    with contextlib.suppress(FileNotFoundError):
        return os.stat(name, dir_fd=fd, follow_symlinks=False).st_ino
    return None
