"""Append to a new file with O_DIRECT: large artifacts go to the disk without the page cache.

Why not ordinary writes: a backup writes gigabytes that nobody reads soon.
Through the page cache each of those bytes first takes a page of memory,
pushes the live instance's own cache out, and is then written back by the
fsync we need anyway. Taking fresh pages is the costly part: on a virtual
machine that hands idle memory back to its host (balloon, free page
reporting) it cost 2-3 CPU-seconds of kernel time per GB here, against
~0.3 s with O_DIRECT (docs/PERFORMANCE.md). O_DIRECT sends aligned blocks
from one reused, page-aligned buffer straight to the disk; the final
partial block goes through the page cache, and fsync then has almost
nothing left to do.

A filesystem without O_DIRECT (tmpfs, some FUSE or network mounts) refuses
it at open() or at the first write with EINVAL: the file then continues
with ordinary buffered writes. Errors (ENOSPC, EDQUOT, EFBIG) surface as
OSError exactly as with buffered writes, only sooner.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

BLOCK = 4096  # covers 512-byte and 4 KiB logical sectors: offsets and lengths stay multiples of it
BUFFER = 4 << 20  # one write per 4 MiB: the disk's latency is paid rarely


class AppendFile:
    """A write-only file created at `path` (flags as for os.open; O_DIRECT is added when it works)."""

    def __init__(self, path, flags: int, mode: int, *, direct: bool = True, buffer_size: int = BUFFER):
        if buffer_size % BLOCK:
            raise ValueError(f"buffer_size must be a multiple of {BLOCK}")
        self.direct = False
        o_direct = getattr(os, "O_DIRECT", 0)
        self.fd = -1
        if direct and o_direct:
            try:
                self.fd = os.open(path, flags | o_direct, mode)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                    raise
        if self.fd < 0:
            self.fd = os.open(path, flags, mode)
        self._buf = mmap.mmap(-1, buffer_size)  # anonymous mappings are page-aligned, as O_DIRECT needs
        self._view = memoryview(self._buf)
        self._fill = 0

    def fileno(self) -> int:
        return self.fd

    def write(self, data) -> int:
        """Copy `data` into the buffer (so the caller may reuse its own); write out every full buffer."""
        src = memoryview(data).cast("B")
        size = len(self._buf)
        total = len(src)
        while src:
            n = min(len(src), size - self._fill)
            self._view[self._fill : self._fill + n] = src[:n]
            self._fill += n
            src = src[n:]
            if self._fill == size:
                self._write_out(self._view[:size])
                self._fill = 0
        return total

    def flush_and_sync(self) -> None:
        """Write what is buffered (the tail through the page cache) and fsync: the data is on disk."""
        if self._fill:
            aligned = self._fill - self._fill % BLOCK
            if aligned:
                self._write_out(self._view[:aligned])
            if self._fill > aligned:
                self._buffered()  # a partial block cannot go through O_DIRECT
                self._write_out(self._view[aligned : self._fill])
            self._fill = 0
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        if self._buf is not None:
            buf, self._buf, self._view = self._buf, None, None
            try:
                buf.close()
            except BufferError:
                pass  # a slice of it lives on in a traceback: the mapping is freed with that slice

    def _write_out(self, view: memoryview) -> None:
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as exc:
                if exc.errno == errno.EINVAL and self.direct:  # accepted at open, refused on write
                    self._buffered()
                    continue
                raise
            view = view[n:]
            if view and self.direct and n % BLOCK:
                self._buffered()  # a short write left the rest unaligned

    def _buffered(self) -> None:
        if self.direct:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            self.direct = False
