"""Write one backup artifact: chain output → encrypt → sha256 → store.

Nothing lands half-written: the store writer commits only after the chain
finished cleanly and the encryption trailer was written; on any error the
writer is aborted (local temp file removed, S3 multipart upload aborted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .backupcrypto import EncryptingWriter
from .streams import CHUNK, HashingWriter, ProcessChain, ThrottledWriter


@dataclass
class ArtifactResult:
    name: str
    size: int  # bytes stored
    sha256: str  # of the stored bytes
    source_bytes: int  # bytes that came out of the chain (compressed, before encryption)
    encrypted: bool
    key_id: str
    # Set only with commit=False: the open writer, which the caller must commit() or abort().
    writer: object = field(default=None, repr=False)


def write_artifact(
    chain: ProcessChain, store, name: str, *, keyring=None, bandwidth: float | None = None,
    on_progress: Callable[[int], None] | None = None, commit: bool = True,
) -> ArtifactResult:
    """Stream one artifact to the store. With commit=False the writer is returned still open, so the
    caller can make it durable (fsync, complete the upload) in the background while the next artifact
    streams; until it commits, the object is invisible and abort() leaves nothing."""
    writer = store.open_write(name)
    try:
        sink = ThrottledWriter(writer, bandwidth) if bandwidth else writer
        hashing = HashingWriter(sink)
        top = EncryptingWriter(hashing, keyring) if keyring is not None else hashing
        buf = bytearray(CHUNK)  # one buffer for the whole stream: the writers below copy what they keep
        view = memoryview(buf)
        with chain:
            while n := chain.read_into(buf):
                top.write(view[:n])
                if on_progress:
                    on_progress(chain.bytes_out)
            chain.finish()
        if keyring is not None:
            top.close()
        if commit:
            writer.commit()
    except BaseException:
        writer.abort()
        raise
    return ArtifactResult(
        name=name, size=hashing.size, sha256=hashing.hexdigest(), source_bytes=chain.bytes_out,
        encrypted=keyring is not None, key_id=top.key_id if keyring is not None else "",
        writer=None if commit else writer,
    )


def write_bytes(store, name: str, data: bytes) -> tuple[int, str]:
    """Small objects (the manifest): same commit/abort discipline."""
    writer = store.open_write(name)
    try:
        hashing = HashingWriter(writer)
        hashing.write(data)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return hashing.size, hashing.hexdigest()


def write_small_artifact(store, name: str, path: str, *, keyring=None, gzip: bool = True) -> ArtifactResult:
    """A small file (a file index, a change list) stored like an artifact — gzip (in this process: no
    compressor to start for a few kB), encryption, sha256, commit — without a process chain. Readers decompress
    it with `gzip -d` like any gzip artifact."""
    import zlib

    writer = store.open_write(name)
    try:
        hashing = HashingWriter(writer)
        top = EncryptingWriter(hashing, keyring) if keyring is not None else hashing
        packer = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip else None  # wbits 31: the gzip format
        plain = 0
        with open(path, "rb") as src:
            while data := src.read(CHUNK):
                plain += len(data)
                top.write(packer.compress(data) if packer else data)
        if packer:
            top.write(packer.flush())
        if keyring is not None:
            top.close()
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return ArtifactResult(name=name, size=hashing.size, sha256=hashing.hexdigest(), source_bytes=plain,
                          encrypted=keyring is not None, key_id=top.key_id if keyring is not None else "")
