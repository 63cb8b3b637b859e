"""Filesystem work below a customer's root, through directory descriptors that never follow a link.

Kasa's worker runs as root, and the folders it works in belong partly to the customer's OS user (`run_as`),
who may change them at any moment: rename a folder away and put a symbolic link in its place, between
Kasa's check and its use. A rename, chmod, chown or delete by path would then follow that link and act
outside the customer's tree (a service path `a/log` with `a` swapped for a link to /var: carrying `a/log`
moves /var/log). So every path below a customer's root is resolved here from the root's own descriptor,
one component at a time, each opened with O_NOFOLLOW|O_DIRECTORY, and the work is done with the *at
functions on the last folder's descriptor (os.rename/os.unlink/os.mkdir with dir_fd, renameat2, os.fwalk).
What a descriptor names cannot be swapped: a folder renamed away after it was opened is still the one Kasa
works in — the customer's own.

A link on the way is refused (LinkRefused) unless Kasa made it: a link that belongs to the worker's own user
(the customer's user can neither make one nor change where one points; it can only remove or replace it, and
a replacement is its own) and that leads below the root — a release symlink (engines.layout), which config
files are written through. Its text is read from the very link checked (an O_PATH descriptor) and resolved
the same way from the root, at most MAX_LINKS times. The last component of a path is never followed: a link
there is renamed, removed or replaced as a link.

Resolution happens before anything changes: a LinkRefused (or NotBeneath) from one of these functions means
nothing was changed, so a journalled step that fails this way has nothing to undo (`refused`).

Paths are given as Kasa journals them (absolute, or relative to the root) and are taken apart lexically:
`..` is refused, as is anything outside the root. The root itself is opened with O_NOFOLLOW (it must not be
a link); the folders above it are Kasa's (KASA_CUSTOMERS_ROOT) and trusted. Component by component rather than
openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS): it runs on any Linux, and Kasa's own release links must be
followed, which openat2 cannot tell from the customer's. Plain Python, no Django.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import stat
import subprocess
from collections.abc import Iterator

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
AT_FDCWD = -100
RENAME_EXCHANGE = 1 << 1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


class BeneathError(OSError):
    """A path below a customer's root that Kasa refuses to work on; nothing was changed."""

    def __str__(self) -> str:  # the sentence, without "[Errno 40]"
        return self.strerror or super().__str__()


class LinkRefused(BeneathError):
    """A component of the path is a symbolic link (it may have been swapped in since it was checked)."""


class NotBeneath(BeneathError):
    """The path is not inside the root (or is the root itself where an entry inside it is needed)."""


# --- taking a path apart ---------------------------------------------------------------------------
def parts(root: str | os.PathLike, path: str | os.PathLike) -> list[str]:
    """The components of `path` below `root` (absolute, or relative to root); [] for the root itself."""
    root_s, raw = os.path.abspath(os.fspath(root)), os.fspath(path)
    if "\x00" in raw:
        raise NotBeneath(errno.EINVAL, f"{raw!r} contains a NUL byte")
    full = raw if os.path.isabs(raw) else os.path.join(root_s, raw)
    if ".." in full.split("/"):
        raise NotBeneath(errno.EINVAL, f"{raw} contains '..'; Kasa names paths below {root_s} without it")
    full = os.path.normpath(full)
    if full == root_s:
        return []
    if not full.startswith(root_s.rstrip("/") + "/"):
        raise NotBeneath(errno.EXDEV, f"{raw} is not inside {root_s}")
    return full[len(root_s.rstrip("/")) + 1:].split("/")


def _shown(root: str, comps: list[str]) -> str:
    return os.path.join(os.path.abspath(os.fspath(root)), *comps)


# --- opening folders ---------------------------------------------------------------------------------
def open_root(root: str | os.PathLike) -> int:
    """A descriptor of the customer's root folder itself (which must be a folder, not a link)."""
    try:
        return os.open(os.fspath(root), DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP) and os.path.islink(root):
            raise LinkRefused(errno.ELOOP, f"{root} is a symbolic link: a customer's root must be a folder, and "
                                           "Kasa follows no link there") from None
        raise


def _step(fd: int, name: str, root: str, comps: list[str]) -> int:
    """Open the folder `name` in `fd` without following a link; _Link when it is one (see open_dir)."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            link = _own_link(fd, name, root, comps)
            if link is not None:
                raise link from None
        if exc.errno == errno.EACCES and os.geteuid() != 0:
            # A folder a worker that is not root may pass through but not read (0100, say): an O_PATH descriptor
            # serves as dir_fd all the same (not for listing or fsync), and nothing is chmodded on the way.
            return os.open(name, _PATH_FLAGS, dir_fd=fd)
        raise


class _Link(Exception):
    """A link of Kasa's own on the way: resolution starts again from the root with `comps`."""

    def __init__(self, comps: list[str]):
        super().__init__()
        self.comps = comps


def _own_link(fd: int, name: str, root: str, comps: list[str]) -> _Link | None:
    """None when `name` is not a link (a file, say). A link is followed only when Kasa made it — it belongs to
    the worker's own user, so the customer's user could neither have made it nor changed where it points (it
    can only remove or replace it, and a replacement is its own) — and when it leads below the root: a
    release symlink (engines.layout), which config files are written through. Any other link: LinkRefused."""
    try:
        lfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except OSError:
        return None
    try:
        st = os.fstat(lfd)
        if not stat.S_ISLNK(st.st_mode):
            return None
        where = _shown(root, comps)
        if st.st_uid != os.geteuid():
            raise LinkRefused(errno.ELOOP, f"{where} is a symbolic link (of uid {st.st_uid}): Kasa follows no "
                                           "link below a customer's root that it did not make (it may have been "
                                           "swapped in since it was checked); nothing was changed there")
        text = os.readlink("", dir_fd=lfd)  # the very link just checked, not one renamed into its place since
    finally:
        os.close(lfd)
    target = os.path.normpath(os.path.join(os.path.dirname(where), text))
    try:
        return _Link(parts(root, target))
    except NotBeneath:
        raise LinkRefused(errno.ELOOP, f"{where} is a symbolic link leading out of {root} ({text}); nothing was "
                                       "changed there") from None


def fsync(fd: int) -> None:
    """fsync a folder's descriptor (not possible on an O_PATH one: see _step)."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EBADF, errno.EINVAL):
            raise


MAX_LINKS = 8  # Kasa's own links followed on one path (a release symlink, perhaps a link to it): never a loop


def open_dir(root: str | os.PathLike, path: str | os.PathLike = "", *, create: bool = False,
             mode: int = 0o755) -> int:
    """A descriptor (the caller closes it) of the folder `path` below `root`, every component opened without
    following a link — but for Kasa's own links that lead below the root (_own_link), whose target is then
    resolved the same way from the root. With create, missing folders are made (`mode` exactly, the worker's)."""
    root_s = os.fspath(root)
    comps = parts(root_s, path)
    for _hop in range(MAX_LINKS + 1):
        try:
            return _open_comps(root_s, comps, create=create, mode=mode)
        except _Link as link:
            comps = link.comps
    raise LinkRefused(errno.ELOOP, f"{path}: more than {MAX_LINKS} links on the way; nothing was changed there")


def _open_comps(root: str, comps: list[str], *, create: bool, mode: int) -> int:
    fd = open_root(root)
    try:
        for i, name in enumerate(comps):
            created = False
            if create:
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                    created = True
                except FileExistsError:
                    pass
            try:
                child = _step(fd, name, root, comps[: i + 1])
            except _Link as link:
                raise _Link(link.comps + comps[i + 1:]) from None
            os.close(fd)
            fd = child
            if created:
                os.fchmod(fd, mode)  # exact, whatever the umask
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def folder(root: str | os.PathLike, path: str | os.PathLike = "", *, create: bool = False,
           mode: int = 0o755) -> Iterator[int]:
    fd = open_dir(root, path, create=create, mode=mode)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def parent(root: str | os.PathLike, path: str | os.PathLike, *, create: bool = False,
           mode: int = 0o755) -> Iterator[tuple[int, str]]:
    """(descriptor of the folder holding `path`, the last component's name); `path` may not be the root."""
    comps = parts(root, path)
    if not comps:
        raise NotBeneath(errno.EINVAL, f"{path} is the root folder itself, not an entry inside it")
    with folder(root, os.path.join(*comps[:-1]) if len(comps) > 1 else "", create=create, mode=mode) as fd:
        yield fd, comps[-1]


def dir_path(fd: int) -> str:
    """A path naming exactly the folder `fd` (for a child process's cwd or a library that wants a path): the
    kernel resolves /proc/self/fd/N to that very folder, whatever was renamed or swapped since."""
    return f"/proc/self/fd/{fd}"


# --- looking -----------------------------------------------------------------------------------------
def lstat(root: str | os.PathLike, path: str | os.PathLike) -> os.stat_result | None:
    """The entry itself (a link is not followed), or None when it (or a folder above it) does not exist."""
    try:
        if not parts(root, path):
            with folder(root) as fd:
                return os.fstat(fd)
        with parent(root, path) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def lexists(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    return lstat(root, path) is not None


def is_dir(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """A real folder (not a link to one)."""
    if not parts(root, path):
        return True
    st = lstat(root, path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def is_link(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    st = lstat(root, path)
    return st is not None and stat.S_ISLNK(st.st_mode)


def readlink(root: str | os.PathLike, path: str | os.PathLike) -> str | None:
    """The text of the link `path`, or None when it is not a link (or does not exist)."""
    try:
        with parent(root, path) as (fd, name):
            return os.readlink(name, dir_fd=fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # not a link
            return None
        raise


def listdir(root: str | os.PathLike, path: str | os.PathLike = "") -> list[str]:
    """The names in a folder ([] when it does not exist)."""
    try:
        with folder(root, path) as fd:
            return os.listdir(fd)
    except (FileNotFoundError, NotADirectoryError):
        return []


def read_file(root: str | os.PathLike, path: str | os.PathLike, *, limit: int = 16 << 20) -> bytes | None:
    """At most `limit` bytes of a regular file (None when it does not exist); a link, FIFO or device is refused
    (NotBeneath): never opened."""
    try:
        with parent(root, path) as (pfd, name):
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pfd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LinkRefused(errno.ELOOP, f"{path} is a symbolic link: not read") from None
        raise
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotBeneath(errno.EINVAL, f"{path} is not a regular file: not read")
        return fh.read(limit)


# --- changing ----------------------------------------------------------------------------------------
def makedirs(root: str | os.PathLike, path: str | os.PathLike, *, mode: int = 0o755) -> None:
    """Every missing folder of `path` created (`mode`, the worker's); an existing one is kept as it is."""
    with folder(root, path, create=True, mode=mode):
        pass


def mkdir(root: str | os.PathLike, path: str | os.PathLike, *, mode: int = 0o700) -> None:
    """A new folder (FileExistsError when the name is taken), exactly `mode`, the worker's."""
    with parent(root, path) as (pfd, name):
        os.mkdir(name, 0o700, dir_fd=pfd)
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
        except OSError:
            raise LinkRefused(errno.EEXIST, f"{path} was replaced while it was created") from None
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                raise LinkRefused(errno.EEXIST, f"{path} was replaced while it was created")
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def rename(root: str | os.PathLike, src: str | os.PathLike, dst: str | os.PathLike, *,
           create_parent: bool = False) -> None:
    """rename(2) between two folders below `root`, both reached without following a link. It replaces an
    existing `dst` as rename(2) does (a file, a link, an empty folder)."""
    with parent(root, src) as (sfd, sname), parent(root, dst, create=create_parent) as (dfd, dname):
        os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        fsync(dfd)
        if not os.path.samestat(os.fstat(sfd), os.fstat(dfd)):
            fsync(sfd)


def exchange_at(a_fd: int, a_name: str, b_fd: int, b_name: str) -> bool:
    """renameat2(RENAME_EXCHANGE): swap two entries in one atomic step. False when the filesystem cannot."""
    if _renameat2 is None:
        return False
    res = _renameat2(a_fd, os.fsencode(a_name), b_fd, os.fsencode(b_name), RENAME_EXCHANGE)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot exchange {a_name} and {b_name}: {os.strerror(err)}")


def symlink(root: str | os.PathLike, target: str, path: str | os.PathLike) -> None:
    with parent(root, path) as (fd, name):
        os.symlink(target, name, dir_fd=fd)


def unlink(root: str | os.PathLike, path: str | os.PathLike, *, missing_ok: bool = False) -> bool:
    """Remove a file or a link (never what it points at). True when something was removed."""
    try:
        with parent(root, path) as (fd, name):
            os.unlink(name, dir_fd=fd)
            return True
    except (FileNotFoundError, NotADirectoryError):
        if missing_ok:
            return False
        raise


def rmdir(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Remove an empty folder; False when it is missing, not empty or not a folder."""
    try:
        with parent(root, path) as (fd, name):
            os.rmdir(name, dir_fd=fd)
            return True
    except (FileNotFoundError, NotADirectoryError, FileExistsError):
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise


def write_file(root: str | os.PathLike, path: str | os.PathLike, data: bytes, *, mode: int = 0o600,
               owner: tuple[int, int] | None = None) -> None:
    """Replace `path` in one step: a new file beside it (O_EXCL|O_NOFOLLOW: nothing someone put there is
    followed), written, chowned to `owner` (uid, gid; when we are root) and chmodded through its descriptor,
    fsynced, then renamed over `path`."""
    with parent(root, path) as (pfd, name):
        tmp = f".{name}.kasa-new-{os.getpid()}-{os.urandom(4).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
        try:
            with os.fdopen(fd, "wb", closefd=False) as fh:
                fh.write(data)
                fh.flush()
            if owner is not None and os.geteuid() == 0:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)  # after the chown, which may clear mode bits
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            fsync(pfd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=pfd)
            raise


def copy_entry(root: str | os.PathLike, src: str | os.PathLike, dst: str | os.PathLike, *,
               owner: tuple[int, int] | None = None) -> None:
    """Copy a regular file (its mode kept) or a link (as a link, never followed) to `dst` (a file or link there
    is replaced)."""
    with parent(root, src) as (sfd, sname), parent(root, dst) as (dfd, dname):
        st = os.stat(sname, dir_fd=sfd, follow_symlinks=False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dname, dir_fd=dfd)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(sname, dir_fd=sfd), dname, dir_fd=dfd)
            if owner is not None and os.geteuid() == 0:
                os.chown(dname, *owner, dir_fd=dfd, follow_symlinks=False)
            return
        if not stat.S_ISREG(st.st_mode):
            raise NotBeneath(errno.EINVAL, f"{src} is neither a file nor a link: not copied")
        fd_in = os.open(sname, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=sfd)
        try:
            fd_out = os.open(dname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=dfd)
            try:
                while chunk := os.read(fd_in, 1 << 20):
                    os.write(fd_out, chunk)
                if owner is not None and os.geteuid() == 0:
                    os.fchown(fd_out, *owner)
                os.fchmod(fd_out, stat.S_IMODE(os.fstat(fd_in).st_mode) & 0o777)
            finally:
                os.close(fd_out)
        finally:
            os.close(fd_in)


def chown(root: str | os.PathLike, path: str | os.PathLike, uid: int, gid: int, *, recursive: bool = False) -> None:
    """lchown `path` (and, recursively, everything below it, walked through descriptors: os.fwalk)."""
    with parent(root, path) as (pfd, name):
        os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
        if not recursive or not stat.S_ISDIR(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode):
            return
        for _dirpath, dirnames, filenames, dirfd in os.fwalk(name, dir_fd=pfd, follow_symlinks=False):
            for entry in dirnames + filenames:
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile by the customer's own code
                    os.chown(entry, uid, gid, dir_fd=dirfd, follow_symlinks=False)


def fsync_dir(root: str | os.PathLike, path: str | os.PathLike = "") -> None:
    with folder(root, path) as fd:
        fsync(fd)


# --- removing trees ----------------------------------------------------------------------------------
def _open_up_at(dirfd: int, name: str) -> None:
    """Give the owner rwx on the folder `name` in `dirfd` (not a link: an O_PATH descriptor opened without
    following one; /proc/self/fd/N then names exactly that folder for chmod). For a worker that is not root,
    which cannot enter or empty its own read-only folders; root needs no permission bits."""
    fd = os.open(name, _PATH_FLAGS, dir_fd=dirfd)
    try:
        os.chmod(dir_path(fd), 0o700)
    finally:
        os.close(fd)


def _enter(dirfd: int, name: str) -> int | None:
    """A descriptor of the folder `name`, opened up for an unprivileged worker; None when it is not a folder
    (any more): the entry was removed as a file or link instead."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dirfd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):  # a file or a link now: removed as such, never followed
            os.unlink(name, dir_fd=dirfd)
            return None
        if exc.errno != errno.EACCES or os.geteuid() == 0:
            raise
        _open_up_at(dirfd, name)
        fd = os.open(name, DIR_FLAGS, dir_fd=dirfd)
    if os.geteuid() != 0 and stat.S_IMODE(os.fstat(fd).st_mode) & 0o700 != 0o700:
        try:
            os.fchmod(fd, 0o700)  # to list it and remove what it holds
        except OSError:
            os.close(fd)
            raise
    return fd


def remove_at(dirfd: int, name: str, *, ignore_errors: bool = False) -> None:
    """Remove `name` in the folder `dirfd` and everything below it, through descriptors only: no link is
    followed and no path is resolved again, so a folder swapped for a link meanwhile costs only the link.
    Read-only folders of a worker that is not root are opened up on the way (engines.trees)."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError:
        if ignore_errors:
            return
        raise
    try:
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dirfd)
            return
        top = _enter(dirfd, name)
    except FileNotFoundError:
        return
    except OSError:
        if ignore_errors:
            return
        raise
    if top is None:
        return
    # An explicit stack (unpacked trees may be deeper than Python's recursion limit): (parent, name, fd, names).
    stack = [(dirfd, name, top, os.listdir(top))]
    try:
        while stack:
            pfd, pname, fd, names = stack[-1]
            if names:
                child = names.pop()
                try:
                    cst = os.stat(child, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISDIR(cst.st_mode):
                        cfd = _enter(fd, child)
                        if cfd is not None:
                            try:
                                stack.append((fd, child, cfd, os.listdir(cfd)))
                            except BaseException:
                                os.close(cfd)
                                raise
                    else:
                        os.unlink(child, dir_fd=fd)
                except FileNotFoundError:
                    pass
                except OSError:
                    if not ignore_errors:
                        raise
                continue
            stack.pop()
            os.close(fd)
            try:
                os.rmdir(pname, dir_fd=pfd)
            except FileNotFoundError:
                pass
            except OSError:
                if not ignore_errors:
                    raise
    finally:
        for _pfd, _pname, fd, _names in stack:
            os.close(fd)


def open_up_at(dirfd: int, name: str) -> None:
    """Give the owner rwx on the folder `name` and every folder below it, through descriptors (a link is
    neither followed nor changed). A no-op for root, whom no permission bit stops."""
    if os.geteuid() == 0:
        return
    try:
        if not stat.S_ISDIR(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
            return
    except FileNotFoundError:
        return
    fd = _enter(dirfd, name)
    if fd is None:
        return
    stack = [fd]
    try:
        while stack:
            fd = stack.pop()
            try:
                for child in os.listdir(fd):
                    with contextlib.suppress(FileNotFoundError):
                        if stat.S_ISDIR(os.stat(child, dir_fd=fd, follow_symlinks=False).st_mode):
                            cfd = _enter(fd, child)
                            if cfd is not None:
                                stack.append(cfd)
            finally:
                os.close(fd)
    finally:
        for fd in stack:
            os.close(fd)


def remove_tree(root: str | os.PathLike, path: str | os.PathLike, *, ignore_errors: bool = False) -> None:
    """Remove `path` below `root` and everything it holds (a file or link: just that entry)."""
    try:
        with parent(root, path) as (fd, name):
            remove_at(fd, name, ignore_errors=ignore_errors)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError:
        if not ignore_errors:
            raise


def detached_remove_at(dirfd: int, name: str) -> None:
    """Remove `name` in `dirfd` by a detached `rm -rf` that the caller does not wait for. rm runs *in* that
    folder (its working folder is the descriptor's folder, through /proc/self/fd) and is given the bare name:
    no path above it is resolved again. rm never follows a link, at the top (it removes the link) or below."""
    open_up_at(dirfd, name)  # `rm -rf` run by a non-root worker cannot empty read-only folders
    subprocess.Popen(["rm", "-rf", "--", name], cwd=dir_path(dirfd), stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
