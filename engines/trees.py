"""Removing a folder tree that may hold read-only folders.

Kasa's worker runs as an unprivileged user in production (systemd `User=kasa`, the Docker image's uid
10001). Such a process cannot delete the entries of a folder without write permission (0555, say) or read
a folder without read permission, although it owns them: `shutil.rmtree` and `rm -rf` then fail, or with
ignore_errors leave the tree behind for good. Backed-up trees may hold such folders, and restores, drills
and upgrades unpack them as they were. Root is not bound by those permissions, so nothing is changed there.
"""

from __future__ import annotations

import os
import shutil
import subprocess

TRASH_PREFIX = ".kasa-trash-"


def open_up(top: str | os.PathLike) -> None:
    """Give the owner rwx on `top` and every folder under it, top-down (a folder is opened before it is
    entered). Symbolic links are neither followed nor changed. A no-op for root."""
    if os.geteuid() == 0 or os.path.islink(top) or not os.path.isdir(top):
        return
    os.chmod(top, 0o700)
    for dirpath, dirnames, _ in os.walk(top):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)


def _gone_unless_folder(path: str) -> bool:
    """True when nothing is left to do: `path` was absent, or a file or link, now unlinked."""
    if not os.path.lexists(path):
        return True
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return True
    return False


def remove_tree(path: str | os.PathLike, *, ignore_errors: bool = False) -> None:
    """Remove a folder (or a file or link) and all it holds, read-only folders included."""
    path = os.fspath(path)
    if _gone_unless_folder(path):
        return
    try:
        open_up(path)
    except OSError:
        if not ignore_errors:
            raise
    shutil.rmtree(path, ignore_errors=ignore_errors)


def discard(path: str | os.PathLike, *, background: bool = False) -> None:
    """Remove a tree: renamed to a trash name first (instant, and a crash leaves a name that says what it is),
    then removed here or, with background, by a detached `rm -rf` the caller does not wait for. Trash left by
    a crash is swept later (layout.sweep, backups.restore)."""
    path = os.fspath(path)
    if _gone_unless_folder(path):
        return
    trash = os.path.join(os.path.dirname(path), TRASH_PREFIX + os.path.basename(path).lstrip(".") + f"-{os.getpid()}")
    os.rename(path, trash)
    if background:
        open_up(trash)  # `rm -rf` run by a non-root worker cannot empty read-only folders
        subprocess.Popen(["rm", "-rf", "--", trash], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,  # noqa: S603
                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    else:
        remove_tree(trash, ignore_errors=True)
