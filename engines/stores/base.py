"""What every storage target offers backup code, and the rules they share.

An object becomes visible only when its writer commits; a writer that is
aborted (or left by an exception) leaves nothing behind. That is what lets a
failed backup be cleaned up completely: there are no half-written objects
that look whole.
"""

from __future__ import annotations

import os
import secrets as _secrets
from collections.abc import Iterable
from typing import BinaryIO, Protocol, runtime_checkable

from ..proc import mask

PROBE_PREFIX = ".kasa-check"
TEMP_SUFFIX = ".part"


class StoreError(RuntimeError):
    """A storage operation failed. The message names the target, never its credentials."""


class StoreNotFound(StoreError):
    """The named object does not exist."""


class StoreLocked(StoreError):
    """The server refused to delete (or shorten) because of an object lock; `until` is when it ends, if known.
    Not a failure of Kasa's: the lock is doing its job. Callers report it as "retained by the lock"."""

    def __init__(self, message: str, until=None):
        super().__init__(message)
        self.until = until


class StoreWriter:
    """A streaming upload that is invisible until commit() and leaves nothing after abort().

    As a context manager it commits on a clean exit and aborts on an exception.
    Subclasses implement _write/_commit/_abort; this class keeps the state so that
    abort() after commit() (or twice) is harmless, and write() after either is a bug.
    """

    name: str

    def __init__(self, name: str):
        self.name = name
        self.size = 0
        self.state = "open"  # open → committed | aborted
        self.version_id = ""  # set by commit() where the store keeps versions (S3 with versioning)

    def write(self, data: bytes) -> int:
        if self.state != "open":
            raise StoreError(f"{self.name}: write after {self.state}")
        if not data:
            return 0
        try:
            self._write(data)
        except BaseException:
            self.abort()  # a writer whose write failed is unusable: leave nothing behind now
            raise
        self.size += len(data)
        return len(data)

    def commit(self) -> int:
        if self.state != "open":
            raise StoreError(f"{self.name}: commit after {self.state}")
        try:
            self._commit()
        except BaseException:
            self.abort()
            raise
        self.state = "committed"
        return self.size

    def abort(self) -> None:
        if self.state != "open":
            return
        self.state = "aborted"
        self._abort()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _write(self, data) -> None:
        """Store `data` (bytes-like). It may be a view of the caller's reused buffer: copy what you keep."""
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError


@runtime_checkable
class Store(Protocol):
    kind: str

    def open_write(self, name: str) -> StoreWriter: ...
    def open_read(self, name: str) -> BinaryIO: ...
    def size(self, name: str) -> int: ...
    def exists(self, name: str) -> bool: ...
    def delete(self, name: str) -> None: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def list(self, prefix: str) -> list[str]: ...
    def location(self, prefix: str) -> str: ...
    def download_url(self, name: str, expires: int) -> str | None: ...
    def check(self) -> str: ...


def clean_name(name: str, *, what: str = "object name") -> str:
    """A '/'-separated relative key with no empty, '.' or '..' parts.

    The same rule for every store, so a name that works on local disk also works
    on S3 and SFTP (and no store can be talked into writing outside its root).
    """
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise StoreError(f"invalid {what} {name!r}: empty, or contains NUL or a backslash")
    if name.startswith("/"):
        raise StoreError(f"invalid {what} {name!r}: must be relative")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid {what} {name!r}: empty, '.' or '..' component")
    return name


def clean_prefix(prefix: str) -> str:
    """A folder prefix: like a name, but '' means the store root. No trailing slash."""
    prefix = (prefix or "").strip("/")
    return clean_name(prefix, what="prefix") if prefix else ""


def under(prefix: str, name: str) -> bool:
    """Folder semantics: 'a/b' holds 'a/b/c', not 'a/bc'."""
    return not prefix or name == prefix or name.startswith(prefix + "/")


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(q for q in parts if q))


def temp_name(final_basename: str) -> str:
    # Hidden and suffixed so list() can skip it, unique so two writers never collide.
    return f".{final_basename}.{_secrets.token_hex(6)}{TEMP_SUFFIX}"


def is_temp(basename: str) -> bool:
    return basename.startswith(".") and basename.endswith(TEMP_SUFFIX)


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """Last line of defence: no credential survives into an error message."""
    return mask(text, [s for s in secrets if s and len(s) >= 4])


def probe(store: Store, describe: str) -> str:
    """Write, read back and delete a small object; the message says what was proven."""
    name = f"{PROBE_PREFIX}-{_secrets.token_hex(6)}"
    payload = os.urandom(1024)
    with store.open_write(name) as w:
        w.write(payload)
    try:
        with store.open_read(name) as fh:
            got = b""
            while len(got) <= len(payload) and (chunk := fh.read(65536)):
                got += chunk
        if got != payload:
            raise StoreError(f"{describe}: the probe object read back differs from what was written")
    finally:
        store.delete(name)
    if store.exists(name):
        raise StoreError(f"{describe}: the probe object is still there after delete")
    return f"{describe}: wrote, read back and deleted a probe object"
