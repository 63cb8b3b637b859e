"""A folder on an SSH server, over SFTP (paramiko: the standard library has no SSH client).

Writes go to a hidden temp name in the target folder and are moved over the
final name with the posix-rename@openssh.com extension, which replaces
atomically (plain SFTP rename refuses to overwrite). The server's host key is
pinned when `host_key` is given (an OpenSSH public key line or a SHA256:
fingerprint); without it the key is accepted and reported by check(), because
a mismatch later can only be caught against a key someone wrote down.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import posixpath
import socket
import stat
import threading
from typing import BinaryIO

import paramiko

from .base import StoreError, StoreNotFound, StoreWriter, clean_name, clean_prefix, is_temp, join, probe, scrub
from .base import temp_name as _temp_name

FILE_MODE = 0o600
DIR_MODE = 0o700
_NO_ROOM = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit reached"}


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256:… form, as `ssh-keygen -lf` prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def load_private_key(text: str, password: str | None = None) -> paramiko.PKey:
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text.strip() + "\n"), password=password)
        except (paramiko.SSHException, ValueError):
            continue
    raise StoreError("the SFTP private key is not an Ed25519, ECDSA or RSA key in OpenSSH or PEM form "
                     "(or it needs a passphrase)")


class SFTPWriter(StoreWriter):
    def __init__(self, store: SFTPStore, name: str, path: str):
        super().__init__(name)
        self._store, self._final = store, path
        folder, base = posixpath.split(path)
        self._tmp = posixpath.join(folder, _temp_name(base))
        with store._op("creating", name):
            sftp = store.sftp()
            store._makedirs(folder)
            self._fh = sftp.open(self._tmp, "wb")
            try:
                self._fh.chmod(FILE_MODE)
            except BaseException:
                self._abort()
                raise
            self._fh.set_pipelined(True)  # don't wait for each write's ack: a round trip per 32 KB is slow

    def _write(self, data) -> None:
        with self._store._op("writing", self.name):
            self._fh.write(bytes(data))  # paramiko may hold on to it while pipelining; callers reuse buffers

    def _commit(self) -> None:
        with self._store._op("writing", self.name):
            self._fh.close()  # waits for every pipelined write's status: errors surface here
            self._store.sftp().posix_rename(self._tmp, self._final)

    def _abort(self) -> None:
        try:
            self._fh.close()
        except (OSError, paramiko.SSHException):
            pass
        try:
            self._store.sftp().remove(self._tmp)
        except (OSError, paramiko.SSHException, StoreError):
            pass  # connection gone: delete_prefix() removes temp files later


class SFTPStore:
    kind = "sftp"

    def __init__(
        self, host: str, port: int | None, username: str, *, password: str | None = None,
        private_key: str | None = None, path: str, host_key: str | None = None, timeout: float = 10,
    ):
        if not host or not username or not path:
            raise StoreError("SFTP target: host, username and path are required")
        if not password and not private_key:
            raise StoreError(f"SFTP target {host}: give a password or a private key")
        self.host, self.port, self.username = host, int(port or 22), username
        self.root = posixpath.normpath(path)  # absolute, or relative to the login's home folder
        self.host_key, self.timeout = (host_key or "").strip(), timeout
        self._password = password or None
        self._pkey = load_private_key(private_key) if private_key else None
        self._secrets = (password, private_key)
        self._transport: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()
        self.server_fingerprint = ""

    # --- connection ------------------------------------------------------------------
    def sftp(self) -> paramiko.SFTPClient:
        with self._lock:
            if self._sftp is not None and self._transport is not None and self._transport.is_active():
                return self._sftp
            self.close()
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            except OSError as exc:
                raise StoreError(f"SFTP {self.where()}: cannot connect: {exc.strerror or exc}") from None
            transport = paramiko.Transport(sock)
            try:
                transport.banner_timeout = transport.auth_timeout = self.timeout
                transport.start_client(timeout=self.timeout)
                self._verify_host_key(transport.get_remote_server_key())
                if self._pkey is not None:
                    transport.auth_publickey(self.username, self._pkey)
                else:
                    transport.auth_password(self.username, self._password)
                sftp = paramiko.SFTPClient.from_transport(transport)
                sftp.get_channel().settimeout(max(self.timeout, 60))
            except paramiko.AuthenticationException:
                transport.close()
                raise StoreError(f"SFTP {self.where()}: authentication as {self.username} failed") from None
            except (paramiko.SSHException, OSError, EOFError) as exc:
                transport.close()
                raise StoreError(scrub(f"SFTP {self.where()}: {exc or type(exc).__name__}", self._secrets)) from None
            except BaseException:
                transport.close()
                raise
            self._transport, self._sftp = transport, sftp
            return sftp

    def _verify_host_key(self, key: paramiko.PKey) -> None:
        self.server_fingerprint = fingerprint(key)
        if not self.host_key:
            return
        pinned = self.host_key
        if pinned.startswith("SHA256:"):
            ok = pinned.rstrip("=") == self.server_fingerprint
        else:
            fields = pinned.split()
            ok = len(fields) >= 2 and fields[0] == key.get_name() and fields[1] == key.get_base64()
        if not ok:
            raise StoreError(f"SFTP {self.where()}: the server's host key {self.server_fingerprint} does not "
                             f"match the pinned one: refusing to connect (possible man-in-the-middle)")

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        if self._transport is not None:
            self._transport.close()
        self._sftp = self._transport = None

    def __enter__(self) -> SFTPStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- naming and errors ---------------------------------------------------------
    def where(self, path: str = "") -> str:
        return f"sftp://{self.username}@{self.host}:{self.port}{'' if path.startswith('/') else '/'}{path}"

    def _path(self, name: str) -> str:
        return join(self.root, clean_name(name))

    def _op(self, doing: str, name: str):
        return _Translate(self, doing, name)

    def fail(self, exc: BaseException, doing: str, name: str) -> StoreError:
        code = getattr(exc, "errno", None)
        if code == errno.ENOENT:
            return StoreNotFound(f"{name}: no such object at {self.where(self.root)}")
        if code in _NO_ROOM:
            return StoreError(f"{_NO_ROOM[code]} writing {name} at {self.where(self.root)}")
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return StoreError(scrub(f"SFTP {doing} {name} at {self.where(self.root)}: {why}", self._secrets))

    def _makedirs(self, folder: str) -> None:
        sftp = self.sftp()
        missing = []
        while folder not in ("", "/", "."):
            try:
                if stat.S_ISDIR(sftp.stat(folder).st_mode):
                    break
                raise StoreError(f"SFTP {self.where(folder)}: exists and is not a folder")
            except FileNotFoundError:
                missing.append(folder)
                folder = posixpath.dirname(folder)
        for d in reversed(missing):
            try:
                sftp.mkdir(d, DIR_MODE)
            except OSError:
                if not _isdir(sftp, d):  # created meanwhile by another writer: fine
                    raise

    # --- the Store interface --------------------------------------------------------
    def open_write(self, name: str) -> SFTPWriter:
        return SFTPWriter(self, name, self._path(name))

    def open_read(self, name: str) -> BinaryIO:
        # No prefetch(): it reads ahead without bound when the consumer is slower than the network.
        with self._op("reading", name):
            return self.sftp().open(self._path(name), "rb")

    def size(self, name: str) -> int:
        with self._op("looking up", name):
            st = self.sftp().stat(self._path(name))
        if not stat.S_ISREG(st.st_mode):
            raise StoreNotFound(f"{name}: no such object at {self.where(self.root)}")
        return st.st_size

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
        except StoreNotFound:
            return False
        return True

    def delete(self, name: str) -> None:
        try:
            with self._op("deleting", name):
                self.sftp().remove(self._path(name))
        except StoreNotFound:
            pass

    def delete_prefix(self, prefix: str) -> int:
        prefix = clean_prefix(prefix)
        if not prefix:
            raise StoreError("refusing to delete the whole store: delete_prefix needs a folder")
        top = join(self.root, prefix)
        with self._op("deleting", prefix):
            sftp = self.sftp()
            try:
                st = sftp.stat(top)
            except FileNotFoundError:
                return 0
            if not stat.S_ISDIR(st.st_mode):
                sftp.remove(top)
                return 1
            count = 0
            for folder, files, _dirs in reversed(list(self._walk(top, temp_too=True))):  # deepest first
                for f in files:
                    sftp.remove(posixpath.join(folder, f))
                    count += 1
                sftp.rmdir(folder)
            return count

    def _walk(self, top: str, *, temp_too: bool = False):
        """Yield (folder, files, dirs) top-down."""
        sftp = self.sftp()
        stack = [top]
        while stack:
            folder = stack.pop()
            files, dirs = [], []
            for entry in sftp.listdir_attr(folder):
                if stat.S_ISDIR(entry.st_mode):
                    dirs.append(entry.filename)
                elif temp_too or not is_temp(entry.filename):
                    files.append(entry.filename)
            yield folder, files, dirs
            stack.extend(posixpath.join(folder, d) for d in dirs)

    def list(self, prefix: str = "") -> list[str]:
        prefix = clean_prefix(prefix)
        top = join(self.root, prefix) if prefix else self.root
        names = []
        try:
            with self._op("listing", prefix or "/"):
                st = self.sftp().stat(top)
                if not stat.S_ISDIR(st.st_mode):
                    return [prefix]
                for folder, files, _dirs in self._walk(top):
                    rel = posixpath.relpath(folder, self.root)
                    names.extend(f if rel == "." else f"{rel}/{f}" for f in files)
        except StoreNotFound:
            return []
        return sorted(names)

    def location(self, prefix: str = "") -> str:
        return self.where(join(self.root, clean_prefix(prefix)))

    def download_url(self, name: str, expires: int) -> str | None:
        return None  # the web app streams SFTP objects itself

    def check(self) -> str:
        msg = probe(self, f"SFTP {self.where(self.root)}")
        pin = "pinned" if self.host_key else "not pinned: set the host key to pin it"
        return f"{msg}; host key {self.server_fingerprint} ({pin})"


class _Translate:
    """`with store._op(...)`: OSError/SSH errors → StoreError naming the server, never a secret."""

    def __init__(self, store: SFTPStore, doing: str, name: str):
        self.store, self.doing, self.name = store, doing, name

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, StoreError):
            return False
        if isinstance(exc, OSError | paramiko.SSHException | EOFError):
            raise self.store.fail(exc, self.doing, self.name) from None
        return False


def _isdir(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        return stat.S_ISDIR(sftp.stat(path).st_mode)
    except OSError:
        return False
