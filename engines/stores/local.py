"""A folder on a local (or mounted) filesystem.

Objects are written to a hidden temp file in the target folder, fsynced, then
renamed over the final name: rename within one filesystem is atomic, so a
reader sees either nothing or the whole object, and a crash leaves only a temp
file that list() ignores and delete_prefix() removes. Files are 0600 and
folders 0700 because artifacts are a customer's data.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import BinaryIO

from ..directio import AppendFile
from ..paths import PathEscapeError, resolve_inside
from .base import StoreError, StoreNotFound, StoreWriter, clean_name, clean_prefix, is_temp, probe, temp_name, under

FILE_MODE = 0o600
DIR_MODE = 0o700
# Owner = (uid, gid): a worker running as root (to start each customer's code as that customer's user) writes
# objects that Kasa's web process, running as Kasa's own user, must read back for downloads and the Restore
# page: they belong to that user, still 0600/0700.
Owner = tuple[int, int]
# A full disk and a quota both mean "no room"; EFBIG is a per-file size limit (filesystem or RLIMIT_FSIZE).
_NO_ROOM = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit reached"}


class LocalWriter(StoreWriter):
    def __init__(self, store: LocalStore, name: str, final: Path):
        super().__init__(name)
        self._store, self._final = store, final
        store._makedirs(final.parent)
        self._tmp = final.parent / temp_name(final.name)
        try:
            # O_DIRECT where the filesystem has it: gigabytes nobody reads soon stay out of the page cache
            # (engines/directio.py says why and what it saves)
            self._fh = AppendFile(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE,
                                  direct=store.direct)
            if store.owner is not None:
                os.fchown(self._fh.fileno(), *store.owner)
        except OSError as exc:
            raise store._error(exc, "creating", name) from None

    def _write(self, data) -> None:
        try:
            self._fh.write(data)
        except OSError as exc:
            raise self._store._error(exc, "writing", self.name) from None

    def _commit(self) -> None:
        try:
            self._fh.flush_and_sync()  # the data is on disk before the name points at it
            self._fh.close()
            os.replace(self._tmp, self._final)
        except OSError as exc:
            raise self._store._error(exc, "writing", self.name) from None
        _fsync_dir(self._final.parent)  # ... and the rename itself survives a crash

    def _abort(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


class LocalStore:
    kind = "local"

    def __init__(self, root: str | os.PathLike, *, direct: bool = True, owner: Owner | None = None):
        self.root = Path(root).resolve()
        self.direct = direct  # O_DIRECT writes where the filesystem allows them
        self.owner = owner if owner is not None and os.geteuid() == 0 else None
        try:
            self._makedirs(self.root, inside=False)
        except OSError as exc:
            raise StoreError(f"local folder {self.root}: cannot create it: {exc.strerror}") from None

    # --- paths -------------------------------------------------------------------
    def _path(self, name: str, *, what: str = "object name") -> Path:
        clean_name(name, what=what)  # relative, no '..': checked before touching the filesystem
        try:
            return resolve_inside(name, self.root, what=what)  # catches a symlink that leads out
        except PathEscapeError as exc:
            raise StoreError(str(exc)) from None

    def _makedirs(self, folder: Path, *, inside: bool = True) -> None:
        # os.makedirs applies `mode` to the last folder only; each level we create must be 0700.
        missing = []
        p = folder
        while not p.exists():
            missing.append(p)
            if inside and p == self.root:
                break
            p = p.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, DIR_MODE)
            except FileExistsError:
                continue
            os.chmod(d, DIR_MODE)  # the umask may have taken bits away; make it exact
            if self.owner is not None:
                os.chown(d, *self.owner, follow_symlinks=False)

    def _error(self, exc: OSError, doing: str, name: str) -> StoreError:
        why = _NO_ROOM.get(exc.errno)
        if why:
            return StoreError(f"{why} writing {name} in local folder {self.root}")
        return StoreError(f"local folder {self.root}: {doing} {name}: {exc.strerror or exc}")

    # --- the Store interface --------------------------------------------------------
    def open_write(self, name: str) -> LocalWriter:
        return LocalWriter(self, name, self._path(name))

    def open_read(self, name: str) -> BinaryIO:
        try:
            return open(self._path(name), "rb")  # noqa: SIM115 (the caller closes it)
        except FileNotFoundError:
            raise StoreNotFound(f"{name}: no such object in local folder {self.root}") from None
        except OSError as exc:
            raise self._error(exc, "reading", name) from None

    def size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            raise StoreNotFound(f"{name}: no such object in local folder {self.root}") from None

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._error(exc, "deleting", name) from None
        self._prune_empty(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        prefix = clean_prefix(prefix)
        if not prefix:
            raise StoreError("refusing to delete the whole store: delete_prefix needs a folder")
        folder = self._path(prefix, what="prefix")
        if not folder.exists():
            return 0
        if folder.is_file():
            folder.unlink()
            return 1
        # Counts temp files too: a killed writer's leftovers are part of what is removed.
        count = sum(len(files) for _, _, files in os.walk(folder))
        try:
            shutil.rmtree(folder)
        except OSError as exc:
            raise self._error(exc, "deleting", prefix) from None
        self._prune_empty(folder.parent)
        return count

    def list(self, prefix: str = "") -> list[str]:
        prefix = clean_prefix(prefix)
        start = self._path(prefix, what="prefix") if prefix else self.root
        if start.is_file():
            return [prefix]
        root = self.root
        names = []
        for dirpath, _dirs, files in os.walk(start):
            for f in files:
                if is_temp(f):
                    continue
                name = Path(dirpath, f).relative_to(root).as_posix()
                if under(prefix, name):
                    names.append(name)
        return sorted(names)

    def location(self, prefix: str = "") -> str:
        prefix = clean_prefix(prefix)
        return str(self.root / prefix) if prefix else str(self.root)

    def download_url(self, name: str, expires: int) -> str | None:
        return None  # the web app streams local objects itself

    def check(self) -> str:
        try:
            return probe(self, f"local folder {self.root}")
        except OSError as exc:
            raise StoreError(f"local folder {self.root}: {exc.strerror or exc}") from None

    def _prune_empty(self, folder: Path) -> None:
        root = self.root
        while folder != root and root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return  # not empty (or gone): stop climbing
            folder = folder.parent


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
