"""Removing a folder tree: through descriptors (no link followed), read-only folders included.

Kasa's worker may run as an unprivileged user (development, or a deployment without customer users). Such a
process cannot delete the entries of a folder without write permission (0555, say) or read a folder without
read permission, although it owns them: `shutil.rmtree` and `rm -rf` then fail, or with ignore_errors leave
the tree behind for good. Backed-up trees may hold such folders, and restores, drills and upgrades unpack them
as they were. Root is not bound by those permissions, so nothing is chmodded there.

The worker as root removes trees inside customer folders, which the customer's user may change meanwhile: the
work goes through directory descriptors (engines.beneath). With `root` (the customer's root, or a copy's), the
path is reached from that root without following any link below it (beneath.LinkRefused otherwise); without,
the path's parent is Kasa's own (a scratch folder) and opened as it is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Iterator

from . import beneath

TRASH_PREFIX = ".kasa-trash-"


@contextlib.contextmanager
def _parent(path: str, root) -> Iterator[tuple[int, str]]:
    if root is not None:
        with beneath.parent(root, path) as found:
            yield found
        return
    path = os.path.abspath(path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd, os.path.basename(path)
    finally:
        os.close(fd)


def open_up(top: str | os.PathLike, *, root: str | os.PathLike | None = None) -> None:
    """Give the owner rwx on `top` and every folder under it, top-down (a folder is opened before it is
    entered), through descriptors. Symbolic links are neither followed nor changed. A no-op for root."""
    if os.geteuid() == 0:
        return
    try:
        with _parent(os.fspath(top), root) as (fd, name):
            beneath.open_up_at(fd, name)
    except (FileNotFoundError, NotADirectoryError):
        return


def remove_tree(path: str | os.PathLike, *, ignore_errors: bool = False,
                root: str | os.PathLike | None = None) -> None:
    """Remove a folder (or a file or link) and all it holds, read-only folders included."""
    try:
        with _parent(os.fspath(path), root) as (fd, name):
            beneath.remove_at(fd, name, ignore_errors=ignore_errors)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError:
        if not ignore_errors:
            raise


def trash_name(name: str) -> str:
    return f"{TRASH_PREFIX}{name.lstrip('.')}-{os.getpid()}-{os.urandom(3).hex()}"


def discard(path: str | os.PathLike, *, background: bool = False, root: str | os.PathLike | None = None,
            trash_dir: str | os.PathLike | None = None) -> None:
    """Remove a tree, leaving no trash in the folder that held it once this returns.

    Renamed to a trash name first (instant, and a crash leaves a name that says what it is). Without
    `background`, removed here. With `background` and `trash_dir` (a Kasa-owned folder on the same filesystem,
    outside every customer's root: KASA_CUSTOMERS_ROOT/.kasa-trash), the rename moves it there — one rename
    from the folder's descriptor into the trash folder's — and a detached `rm -rf` that the caller does not
    wait for removes it in the trash folder: a restore returns at once and the customer's root holds no
    `.kasa-trash-*` (its user cannot reach the tree any more either). On another filesystem (EXDEV), or without
    a trash_dir, it is removed here, before returning. Trash left by a crash is swept later (sweep_trash,
    layout.sweep, backups.restore_files)."""
    try:
        with _parent(os.fspath(path), root) as (fd, name):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=fd)
                return
            trash = trash_name(name)
            if background and trash_dir is not None and _moved_out(fd, name, trash, trash_dir):
                return
            os.rename(name, trash, src_dir_fd=fd, dst_dir_fd=fd)
            beneath.remove_at(fd, trash, ignore_errors=True)
    except (FileNotFoundError, NotADirectoryError):
        return


def _moved_out(fd: int, name: str, trash: str, trash_dir: str | os.PathLike) -> bool:
    """Move `name` (in `fd`) into Kasa's trash folder as `trash` and start its detached removal there. False when
    it cannot be moved (another filesystem: EXDEV; a trash folder that cannot be made): it is still where it was,
    and the caller removes it in place."""
    try:
        tfd = _trash_folder(trash_dir)
    except OSError:
        return False
    try:
        try:
            os.rename(name, trash, src_dir_fd=fd, dst_dir_fd=tfd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise
            return False
        beneath.detached_remove_at(tfd, trash)
        return True
    finally:
        os.close(tfd)


def _trash_folder(trash_dir: str | os.PathLike) -> int:
    """A descriptor of Kasa's trash folder, made 0700 when missing; never a link."""
    os.makedirs(trash_dir, mode=0o700, exist_ok=True)
    return os.open(trash_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def sweep_trash(trash_dir: str | os.PathLike, *, older_than: float = 3600.0) -> list[str]:
    """Remove what a crash left in Kasa's trash folder: entries renamed there more than `older_than` seconds ago
    (a younger one may still be in the hands of its detached `rm`). Returns the names removed."""
    removed = []
    try:
        fd = os.open(trash_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    try:
        now = time.time()
        for name in os.listdir(fd):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if name.startswith(TRASH_PREFIX) and now - st.st_ctime > older_than:  # ctime: set by the rename
                beneath.remove_at(fd, name, ignore_errors=True)
                removed.append(name)
    finally:
        os.close(fd)
    return removed
