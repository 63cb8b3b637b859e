"""Unpack a checked component zip into its release folder, owned by the customer's user.

    <root>/releases/<version>/.<component>.kasa-stage-<tag>/   unpacked here (the worker's, 0700, meanwhile)
    <root>/releases/<version>/<component>/                      then renamed here, complete or absent

The zip was checked (engines.zipcheck) when it was imported and again just before; this still refuses a
member outside its top folder or the component folder, and a link that resolves outside it (the same
confinement, zipcheck.confine, on the names as unpacked). Everything is reached through directory
descriptors opened without following links, from the customer's root down: no folder or link that someone
else puts in the way is followed, and nothing is written anywhere but in the staging folder, which nobody
else can enter until it is complete. Links are created last. Setuid/setgid bits are never applied (file
modes keep their permission bits only, folders are 0755); the result lists the members that had them.

With an `owner` (the customer's run_as user) every entry is given to it as it is created and the staging
folder last, just before it is renamed into place: hooks and services, which run as that user, may write
there. Without one (development) the worker keeps them.
"""

from __future__ import annotations

import os
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from . import beneath, runas
from .layout import LayoutError, staging_path
from .streams import CHUNK
from .zipcheck import SETID, ZipRefused, confine, unix_mode

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Staged:
    path: Path
    files: int = 0
    setid: list[tuple[str, int]] = field(default_factory=list)  # (member, mode) whose set-id bits were dropped


def stage_zip(zip_path: str | os.PathLike, root: str | os.PathLike, dest: str | os.PathLike, *, root_folder: str,
              tag: str, owner: runas.Identity | None = None) -> Staged:
    """Unpack into a hidden folder beside `dest` (a folder under `root` that must not exist yet), then rename
    it to `dest`: a release folder is complete or absent. The folders between `root` and `dest` are created
    when missing (0755, the worker's). The half-unpacked folder is removed on failure."""
    root, dest = Path(root), Path(dest)
    if owner is not None and not runas.can_switch_to(owner):
        raise LayoutError(f"the worker runs as uid {os.geteuid()} and cannot give the release folder to {owner}: "
                          "run the worker as root, or leave run_as empty; nothing was staged")
    try:
        rel = dest.relative_to(root)
    except ValueError:
        raise LayoutError(f"{dest} is not inside {root}; nothing was staged") from None
    tmp = staging_path(dest, tag)
    parent = _open_parents(root, rel.parts[:-1])
    try:
        if _exists(dest.name, parent):
            raise LayoutError(f"{dest} exists already; nothing was staged")
        if _exists(tmp.name, parent):
            beneath.remove_at(parent, tmp.name)
        os.mkdir(tmp.name, 0o700, dir_fd=parent)
        top = os.open(tmp.name, _DIR_FLAGS, dir_fd=parent)
        try:
            staged = Staged(dest)
            try:
                if os.fstat(top).st_uid != os.geteuid():
                    raise LayoutError(f"{tmp} was replaced while it was created; nothing was staged")
                _extract(zip_path, top, root_folder=root_folder, owner=owner, staged=staged)
                _give(top, None, owner)
                os.fchmod(top, 0o755)
                os.rename(tmp.name, dest.name, src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException as exc:
                beneath.remove_at(parent, tmp.name, ignore_errors=True)
                if isinstance(exc, OSError):  # a member that cannot be written (a file where a folder should be)
                    raise LayoutError(f"unpacking {os.path.basename(zip_path)} failed: {exc}; nothing was "
                                      "staged") from None
                raise
        finally:
            os.close(top)
        os.fsync(parent)
    finally:
        os.close(parent)
    return staged


def _open_parents(root: Path, parts: tuple[str, ...]) -> int:
    """A descriptor of root/parts..., each folder opened without following a link, created (0755) if missing."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
                created = True
            except FileExistsError:
                created = False
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                raise LayoutError(f"{root}/{part} is not a folder (a symbolic link?); nothing was staged") from None
            os.close(fd)
            fd = child
            if created:
                os.fchmod(fd, 0o755)  # exact, whatever the umask: the customer's user goes through it
    except BaseException:
        os.close(fd)
        raise
    return fd


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


def _give(fd: int, name: str | None, owner: runas.Identity | None) -> None:
    if owner is not None and os.geteuid() == 0:
        if name is None:
            os.fchown(fd, owner.uid, owner.gid)
        else:
            os.chown(name, owner.uid, owner.gid, dir_fd=fd, follow_symlinks=False)


def _extract(zip_path, top: int, *, root_folder: str, owner, staged: Staged) -> None:
    prefix = f"{root_folder.strip('/')}/" if root_folder else ""
    with zipfile.ZipFile(zip_path) as zf:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            name = info.filename
            if prefix:
                if name.rstrip("/") == prefix.rstrip("/"):
                    continue
                if not name.startswith(prefix):
                    raise LayoutError(f"zip member {name!r} is outside its top folder {root_folder!r}; "
                                      "nothing was staged")
                name = name[len(prefix):]
            parts = [p for p in name.split("/") if p not in ("", ".")]
            if not parts:
                continue
            if ".." in parts or name.startswith("/") or "\\" in name:
                raise LayoutError(f"zip member {info.filename!r} leaves the component folder; nothing was staged")
            members["/".join(parts)] = info
        links = {n: zf.read(i).decode("utf-8") for n, i in members.items() if stat.S_ISLNK(unix_mode(i))}
        try:
            confine(list(members), links, shown=lambda n: members[n].filename)
        except ZipRefused as exc:
            raise LayoutError(f"{exc}; nothing was staged") from None
        for name, info in members.items():
            mode = unix_mode(info)
            if mode & SETID and name not in links:
                staged.setid.append((info.filename, mode))
            if name in links:
                continue
            *folders, last = name.split("/")
            if info.is_dir() or stat.S_ISDIR(mode):
                os.close(_folder(top, [*folders, last], owner))
                continue
            fd = _folder(top, folders, owner)
            try:
                _write_file(zf, info, fd, last, (stat.S_IMODE(mode) & 0o777) or 0o644, owner)
            finally:
                os.close(fd)
            staged.files += 1
        for name, target in links.items():
            *folders, last = name.split("/")
            fd = _folder(top, folders, owner)
            try:
                os.symlink(target, last, dir_fd=fd)
                _give(fd, last, owner)
            finally:
                os.close(fd)


def _folder(top: int, parts: list[str], owner) -> int:
    """A new descriptor of top/parts..., folders created 0755 (and given to the owner) on the way."""
    fd = os.dup(top)
    try:
        for part in parts:
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
                os.chmod(part, 0o755, dir_fd=fd)  # exact, whatever the umask (not a link: we just made it)
                _give(fd, part, owner)
            except FileExistsError:
                pass
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)  # a file of that name: NotADirectoryError
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_file(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dir_fd: int, name: str, mode: int, owner) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    with zf.open(info) as src, os.fdopen(fd, "wb") as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
        _give(out.fileno(), None, owner)
        os.fchmod(out.fileno(), mode)  # after the chown, which may clear mode bits
