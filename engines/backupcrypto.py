"""Authenticated streaming encryption of backup artifacts (format: docs/FORMAT.md).

Every artifact gets its own random data key. The body is encrypted with
Cobblestone-256 (chunked AES-256-GCM: each 16 KiB chunk is authenticated in
order and the last one marks the end, so tampering, reordering and truncation
are all detected). The data key is wrapped with AES-256-GCM under a
key-encryption key (KEK) stretched from an operator string in KASA_BACKUP_KEYS,
and the header names that key by a short id. Rotation is therefore cheap: put
a new key in front, new artifacts use it, old artifacts keep decrypting as long
as their key stays in the list, and nothing is re-encrypted.

The whole header is the GCM associated data of the key wrap (minus the wrapped
key itself) and the Cobblestone context of the body, so no header field can be
changed, and no header can be moved onto another body, without the check failing.

A streaming decryptor hands out authenticated chunks before it can know that
the stream is complete; only the final check proves nothing was cut off. Hence
decrypt_file(), which writes to a temporary file and renames it into place only
after that check: a failed decryption leaves no partial output behind.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from cryptography.cobblestone import Cobblestone256Decryptor, Cobblestone256Encryptor
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from engines.secretbox import SecretKeyError, parse_keys

MAGIC = b"KASAENC1"
VERSION = 1
KEK_INFO = b"kasa backup kek v1"
KEY_ID_INFO = b"kasa backup key id v1"
KEY_ID_BYTES = 8  # shown as 16 hex characters
WRAP_NONCE_BYTES = 12
WRAPPED_KEY_BYTES = 32 + 16  # AES-256-GCM of a 32-byte data key, with its tag
# magic | version (u8) | key id | wrap nonce | wrapped data key
_HEADER = struct.Struct(f">{len(MAGIC)}sB{KEY_ID_BYTES}s{WRAP_NONCE_BYTES}s{WRAPPED_KEY_BYTES}s")
HEADER_SIZE = _HEADER.size  # 77
_AAD_SIZE = HEADER_SIZE - WRAPPED_KEY_BYTES  # everything before the wrapped key

# Bounds the ciphertext one write() hands on, whatever size the caller passes.
_WRITE_SLICE = 1 << 20
_COBBLE_CHUNK = 1 << 14  # Cobblestone's plaintext chunk; each ciphertext chunk carries a 16-byte tag


def _out_room(n: int) -> int:
    """Room update_into() may need for n plaintext bytes: a pending chunk, a tag per chunk, the nonce."""
    return n + _COBBLE_CHUNK + (n // _COBBLE_CHUNK + 2) * 16 + 64


class BackupKeyError(SecretKeyError):
    """KASA_BACKUP_KEYS is unusable (empty, a key too short)."""


class UnknownKeyId(KeyError):
    """No key in KASA_BACKUP_KEYS has this id."""

    def __init__(self, key_id: str):
        super().__init__(key_id)
        self.key_id = key_id

    def __str__(self) -> str:  # KeyError would show the quoted repr of the id only
        return f"no key with id {self.key_id} in KASA_BACKUP_KEYS"


class BackupDecryptError(ValueError):
    """An artifact cannot be decrypted. The message says why; it never holds a key."""


class Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


def _hkdf(key: str, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key.encode("utf-8"))


def key_id(key: str) -> str:
    """A key's id (16 hex digits): the same for artifacts and manifests (docs/FORMAT.md)."""
    return hashlib.sha256(_hkdf(key, KEY_ID_INFO)).hexdigest()[: KEY_ID_BYTES * 2]


def derive_by_id(keys: Iterable[str], info: bytes) -> dict[str, bytes]:
    """{key id: HKDF-SHA256(key, info)} for parsed keys, newest first; a repeated key is one entry."""
    derived: dict[str, bytes] = {}
    for key in keys:
        derived.setdefault(key_id(key), _hkdf(key, info))
    return derived


class KeyRing:
    """The KEKs derived from KASA_BACKUP_KEYS, newest first, addressed by key id.

    The id is a hash of an HKDF output with its own info string, so it is
    stable for a given key, tells nothing about the key or the KEK, and lets
    an operator see which key an artifact needs.
    """

    def __init__(self, keys: str | Iterable[str]):
        try:
            parsed = parse_keys(keys)
        except SecretKeyError as exc:
            raise BackupKeyError(f"KASA_BACKUP_KEYS: {exc}") from None
        self._keks = derive_by_id(parsed, KEK_INFO)
        self.current_id = next(iter(self._keks))

    @property
    def ids(self) -> list[str]:
        return list(self._keks)

    def kek(self, key_id: str) -> bytes:
        try:
            return self._keks[key_id]
        except KeyError:
            raise UnknownKeyId(key_id) from None

    def __repr__(self) -> str:
        return f"<KeyRing ids={self.ids}>"


@dataclass(frozen=True)
class HeaderInfo:
    version: int
    key_id: str


def is_encrypted(first_bytes: bytes) -> bool:
    """True when these leading bytes start a Kasa encrypted artifact."""
    return bytes(first_bytes[: len(MAGIC)]) == MAGIC


def _read_exact(src: Readable, n: int) -> bytes:
    # read() may return less than asked (pipes, sockets); only b"" means the end.
    parts, got = [], 0
    while got < n:
        part = src.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _parse_header(header: bytes) -> tuple[int, bytes, bytes, bytes]:
    if not is_encrypted(header):
        raise BackupDecryptError("not a Kasa encrypted backup artifact (the file does not start with KASAENC1)")
    if len(header) > len(MAGIC) and header[len(MAGIC)] != VERSION:
        raise BackupDecryptError(
            f"unsupported encrypted artifact version {header[len(MAGIC)]} (this Kasa reads version {VERSION})"
        )
    if len(header) < HEADER_SIZE:
        raise BackupDecryptError("the encrypted artifact is truncated: its header is incomplete")
    _, version, key_id, nonce, wrapped = _HEADER.unpack(header)
    return version, key_id, nonce, wrapped


def read_header(fileobj: Readable) -> HeaderInfo:
    """Read and check the header (no key needed); the stream is left just after it."""
    version, key_id, _, _ = _parse_header(_read_exact(fileobj, HEADER_SIZE))
    return HeaderInfo(version=version, key_id=key_id.hex())


class EncryptingWriter:
    """Encrypts what is written to it and forwards the ciphertext to `out`.

    close() writes the final chunk; without it the artifact reads as truncated.
    Used as a context manager, an exception inside the block skips that final
    chunk on purpose, so an aborted stream can never pass for a complete one.
    `out` stays open: it belongs to the caller (the next stage of a pipeline).
    """

    def __init__(self, out: Writable, keyring: KeyRing):
        self._out = out
        self.key_id = keyring.current_id
        data_key = Cobblestone256Encryptor.generate_key()
        nonce = secrets.token_bytes(WRAP_NONCE_BYTES)
        aad = _HEADER.pack(MAGIC, VERSION, bytes.fromhex(self.key_id), nonce, b"")[:_AAD_SIZE]
        header = aad + AESGCM(keyring.kek(self.key_id)).encrypt(nonce, data_key, aad)
        self._enc = Cobblestone256Encryptor(data_key, header)
        self._closed = False
        self._buf: bytearray | None = None
        self._view: memoryview | None = None
        out.write(header)
        self.bytes_in = 0
        self.bytes_out = len(header)

    def _forward(self, data) -> None:
        if data:
            self._out.write(data)
            self.bytes_out += len(data)

    def write(self, data) -> int:
        """Encrypt into one reused buffer and hand `out` a view of it.

        `out` must copy what it keeps (every store writer and hashlib do): the
        view is overwritten by the next write. No allocation per chunk.
        """
        if self._closed:
            raise ValueError("write to a closed EncryptingWriter")
        view = memoryview(data).cast("B")
        if self._buf is None:
            self._buf = bytearray(_out_room(_WRITE_SLICE))
            self._view = memoryview(self._buf)
        for start in range(0, len(view), _WRITE_SLICE):
            n = self._enc.update_into(view[start : start + _WRITE_SLICE], self._buf)
            self._forward(self._view[:n])
        self.bytes_in += len(view)
        return len(view)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._forward(self._enc.finalize())

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> EncryptingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True  # abandoned without its final chunk: undecryptable


def decrypt_stream(src: Readable, dst: Writable, keyring: KeyRing, chunk_size: int = 1 << 20) -> int:
    """Decrypt src into dst; return the number of plaintext bytes written.

    Raises BackupDecryptError on any problem. dst may already have received
    authenticated chunks when a later one fails (truncation shows only at the
    end): write to somewhere you can throw away, or use decrypt_file().
    """
    header = _read_exact(src, HEADER_SIZE)
    _, key_id, nonce, wrapped = _parse_header(header)
    try:
        kek = keyring.kek(key_id.hex())
    except UnknownKeyId:
        raise BackupDecryptError(
            f"this artifact was encrypted with key id {key_id.hex()}, which is not in KASA_BACKUP_KEYS "
            f"(configured key ids: {', '.join(keyring.ids)}); add the key that was in use when it was made"
        ) from None
    try:
        data_key = AESGCM(kek).decrypt(nonce, wrapped, header[:_AAD_SIZE])
    except InvalidTag:
        raise BackupDecryptError(
            f"the header does not authenticate under key id {key_id.hex()}: the header was altered"
        ) from None
    dec = Cobblestone256Decryptor(data_key, header)
    written = 0
    try:
        while block := src.read(chunk_size):
            plain = dec.update(block)
            dst.write(plain)
            written += len(plain)
    except InvalidTag:
        raise BackupDecryptError(
            f"the encrypted data is corrupt or was tampered with (authentication failed after {written} "
            "good plaintext bytes)"
        ) from None
    try:
        plain = dec.finalize()
    except InvalidTag:
        raise BackupDecryptError(
            "the encrypted artifact is truncated, or its end was altered (the final chunk does not authenticate)"
        ) from None
    dst.write(plain)
    return written + len(plain)


def decrypt_file(path: str | os.PathLike, out_path: str | os.PathLike, keyring: KeyRing) -> int:
    """Decrypt the file at path to out_path; return the plaintext size.

    The plaintext goes to a 0600 temporary file beside out_path and is renamed
    over out_path only once the whole artifact authenticated, so on any error
    out_path is untouched and no partial file is left.
    """
    out_path = os.fspath(out_path)
    folder = os.path.dirname(os.path.abspath(out_path))
    with open(path, "rb") as src:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(out_path)}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as dst:
                size = decrypt_stream(src, dst, keyring)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, out_path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
    _fsync_dir(folder)
    return size


def _fsync_dir(folder: str) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "VERSION",
    "BackupDecryptError",
    "BackupKeyError",
    "EncryptingWriter",
    "HeaderInfo",
    "KeyRing",
    "UnknownKeyId",
    "decrypt_file",
    "decrypt_stream",
    "is_encrypted",
    "read_header",
]
