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
import os
import stat
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


def discard(path: str | os.PathLike, *, background: bool = False, root: str | os.PathLike | None = None) -> None:
    """Remove a tree: renamed to a trash name first (instant, and a crash leaves a name that says what it is),
    then removed here or, with background, by a detached `rm -rf` the caller does not wait for — both in the
    folder's descriptor, reached once: the rename and the removal act on the same folder whatever is swapped
    meanwhile. Trash left by a crash is swept later (layout.sweep, backups.restore)."""
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
            os.rename(name, trash, src_dir_fd=fd, dst_dir_fd=fd)
            if background:
                beneath.detached_remove_at(fd, trash)
            else:
                beneath.remove_at(fd, trash, ignore_errors=True)
    except (FileNotFoundError, NotADirectoryError):
        return
