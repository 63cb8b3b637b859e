"""One tar stream from a full's archive and a differential's: the tree at the differential's moment.

The full's archive was written by GNU tar with `--sort=name`; the change list (engines.fileindex) is in the
same order. Streaming both side by side, every member of the full that the change list names is left out
(a newer copy follows in the differential, or it was deleted), as is everything under a folder the list marks
deleted (`-`) or replaced by another type (`R`). The full's end-of-archive blocks are dropped and the
differential's archive follows whole. Memory stays flat: one member's headers, one change record.

This only splits members and leaves some out; it trusts nothing it reads: the merged stream goes through
engines.tarcheck.TarScanner like any archive (a path appearing twice, a hard link to a member left out…
is refused there), and both archives were authenticated by their checksums and encryption.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .fileindex import key, under

BLOCK = 512
_META = (b"x", b"g", b"L", b"K")
MAX_META = 1 << 20  # a pax header or long name larger than this is not one Kasa's tar wrote


class MergeError(ValueError):
    """The full's archive cannot be merged (not in name order, a header this splitter does not know)."""


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if field[:1] and field[0] & 0x80:  # base-256 (GNU) for large sizes
        n = int.from_bytes(field, "big") & ~(0x80 << (8 * (len(field) - 1)))
        return n
    try:
        return int(field or b"0", 8)
    except ValueError:
        raise MergeError(f"a header's size field {field[:12]!r} is not a number") from None


def _pax(data: bytes) -> dict[bytes, bytes]:
    out, pos = {}, 0
    while pos < len(data):
        if data[pos] == 0:
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise MergeError("malformed pax header")
        try:
            end = pos + int(data[pos:sp])
        except ValueError:
            raise MergeError("malformed pax header") from None
        rec = data[sp + 1 : end - 1]
        k, _, v = rec.partition(b"=")
        out[k] = v
        pos = end
    return out


def _normal(name: bytes) -> bytes:
    name = name.rstrip(b"/")
    while name.startswith(b"./"):
        name = name[2:]
    return b"" if name in (b".", b"") else name


class _Reader:
    """Exact-size reads over an iterator of chunks (memoryviews, no copies of big data)."""

    def __init__(self, chunks: Iterable[bytes]):
        self.it = iter(chunks)
        self.buf = memoryview(b"")

    def take(self, n: int) -> Iterator[memoryview]:
        """Yield n bytes as pieces."""
        while n > 0:
            if not self.buf:
                nxt = next(self.it, None)
                if nxt is None:
                    raise MergeError("the full's archive ends in the middle of a member")
                self.buf = memoryview(nxt).cast("B")
            piece = self.buf[:n]
            self.buf = self.buf[len(piece):]
            n -= len(piece)
            yield piece

    def read(self, n: int) -> bytes:
        return b"".join(bytes(p) for p in self.take(n))

    def drain(self) -> None:
        for _ in self.it:
            pass


def merge(base: Iterable[bytes], changes: Iterable[tuple[bytes, bytes]], diff: Iterable[bytes]) -> Iterator:
    """Plaintext pieces of the merged archive. `base`/`diff`: plaintext chunks of the two tar archives;
    `changes`: (op, path) from engines.fileindex.read_changes."""
    yield from _filtered(_Reader(base), iter(changes))
    yield from diff


def _filtered(r: _Reader, changes: Iterator[tuple[bytes, bytes]]) -> Iterator:
    change = next(changes, None)
    gone: bytes | None = None
    last: tuple | None = None
    held: list[bytes] = []  # pax / long-name headers of the member being read
    pax: dict[bytes, bytes] = {}
    longname: bytes | None = None
    while True:
        block = r.read(BLOCK)
        if block == bytes(BLOCK):  # end of archive: the rest (a second zero block, padding) is read and dropped
            r.drain()
            for _ in changes:  # read to its end, so its own checks run
                pass
            return
        typeflag = block[156:157]
        size = _octal(block[124:136])
        if typeflag in _META:
            if size > MAX_META:
                raise MergeError(f"an extended header of {size} bytes")
            data = r.read(-(-size // BLOCK) * BLOCK)
            held += [block, data]
            if typeflag == b"x":
                pax = _pax(data[:size])
            elif typeflag == b"L":
                longname = data[:size].split(b"\0", 1)[0]
            continue
        if typeflag == b"S":
            raise MergeError("an old GNU sparse member (Kasa's tar writes pax sparse members)")
        name = block[:100].split(b"\0", 1)[0]
        if block[257:263] == b"ustar\x00" and block[345]:
            name = block[345:500].split(b"\0", 1)[0] + b"/" + name
        name = longname or pax.get(b"GNU.sparse.name") or pax.get(b"path") or name
        if b"size" in pax:
            try:
                size = int(pax[b"size"])
            except ValueError:
                raise MergeError("a pax size that is not a number") from None
        path = _normal(name)
        k = key(path)
        if last is not None and k <= last:
            raise MergeError(f"the full's archive is not in name order at {path[:200]!r} (made without "
                             "--sort=name?)")
        last = k
        # The change list is in the same order: pass the changes before this member, remembering the last
        # deleted or replaced folder (everything of the full under it goes).
        while change is not None and key(change[1]) < k:
            if change[0] in (b"-", b"R") and not (gone is not None and under(change[1], gone)):
                gone = change[1]
            change = next(changes, None)
        drop = gone is not None and under(path, gone)
        if change is not None and change[1] == path:
            drop = True
            if change[0] in (b"-", b"R"):
                gone = path
            change = next(changes, None)
        data_len = -(-size // BLOCK) * BLOCK  # as tarcheck reads it (it refuses a link or folder with data)
        if drop:
            for _ in r.take(data_len):
                pass
        else:
            yield from held
            yield block
            yield from r.take(data_len)
        held, pax, longname = [], {}, None


__all__ = ["MergeError", "merge"]
