"""GNU sparse members in engines.tarcheck's scanner: the old GNU header maps and the pax 1.0 map (what
`tar --sparse --format=posix` writes), read so that the blocks GNU tar consumes are exactly the ones we skip.

A mixin of TarScanner (its state: `_need`, `_state`, `_realsize`, the map being read), kept apart for size.
"""

from __future__ import annotations

from .tarfields import _DIGITS, BLOCK, _decimal, _number

_SPARSE_1_0 = {b"GNU.sparse.name", b"GNU.sparse.major", b"GNU.sparse.minor", b"GNU.sparse.realsize"}
_HEADER, _META, _DATA, _SPARSE_EXT, _SPARSE_MAP = range(5)


class SparseMaps:
    def _pax_sparse_header(self, pax: dict, keys: set, typeflag: bytes, ustar: bool) -> None:
        # GNU tar honours GNU.sparse.* only in POSIX-format regular files; elsewhere realsize alone would
        # make it read the member with a different size than the header's. Only version 1.0 (what
        # `tar --sparse --format=posix` writes) is accepted, and it must be complete.
        if keys != _SPARSE_1_0 or typeflag != b"0" or not ustar:
            self._refuse("an incomplete or misplaced GNU sparse 1.0 pax header")
        if pax[b"GNU.sparse.major"] != b"1" or pax[b"GNU.sparse.minor"] != b"0":
            self._refuse("a GNU sparse format other than 1.0")
        if _decimal(pax[b"GNU.sparse.realsize"]) is None:
            self._refuse("its sparse real size is not a valid number")

    # --- sparse files ------------------------------------------------------------------
    def _add_region(self, offset: int | None, numbytes: int | None) -> None:
        if offset is None or numbytes is None or offset + numbytes > self._realsize:
            self._refuse("its sparse map is invalid")
        self._region_blocks += -(-numbytes // BLOCK)  # GNU tar starts each region on a fresh block
        # The map, not the real size field, decides the file's size: GNU tar writes each region at its
        # offset and truncates the file at the offset of an empty one (a trailing hole).
        self._sparse_end = offset if not numbytes else max(self._sparse_end, offset + numbytes)

    def _regions_fill_data(self, map_blocks: int = 0) -> None:
        # GNU tar consumes the blocks its map names, not the header's size: both must agree.
        if map_blocks + self._region_blocks != self._stored_blocks:
            self._refuse("its sparse map does not match the size of its data")
        if self._sparse_end != self._realsize:
            self._refuse("its sparse map does not match its real size")

    def _oldgnu_sparse(self, block: bytes) -> bool:
        if self._sparse_entries(block, 386, 4) and block[482]:
            self._state = _SPARSE_EXT
            return False  # the extension blocks are part of the header: held back until read
        return self._sparse_header_done()

    def _sparse_entries(self, block: bytes, start: int, count: int) -> bool:
        """Add the map entries of one header block; False when an empty entry ended the map (GNU tar
        then reads no extension block, whatever the 'extended' flag says)."""
        for k in range(count):
            at = start + 24 * k
            if block[at + 12] == 0:
                return False
            self._add_region(_number(block[at : at + 12]), _number(block[at + 12 : at + 24]))
        return True

    def _sparse_ext(self, block: bytes) -> bool:
        if len(self._held) > self.limits.max_pax_header:
            self._refuse(f"its sparse map is longer than the limit of {self.limits.max_pax_header} bytes")
        return False if self._sparse_entries(block, 0, 21) and block[504] else self._sparse_header_done()

    def _sparse_header_done(self) -> bool:
        self._regions_fill_data()
        self._state = _DATA if self._need else _HEADER
        return True

    def _sparse_map(self, view, i: int, n: int) -> int:
        """The GNU sparse 1.0 map at the start of the member's data: decimal lines, count then pairs."""
        take = min(n - i, self._need)
        data = bytes(view[i : i + take])
        pos = 0
        while True:
            j = data.find(b"\n", pos)
            if j < 0:
                self._map_line += data[pos:]
                if len(self._map_line) > 20:
                    self._refuse("its sparse map is malformed")
                pos = len(data)
                break
            line, self._map_line, pos = self._map_line + data[pos:j], b"", j + 1
            if not _DIGITS.match(line):
                self._refuse("its sparse map is malformed")
            self._map_numbers.append(int(line))
            if self._map_expected < 0:
                self._map_expected = 1 + 2 * self._map_numbers.pop()
                self._map_numbers = []
            elif len(self._map_numbers) == 2:
                self._add_region(*self._map_numbers)
                self._map_numbers = []
            self._map_expected -= 1
            if not self._map_expected:
                self._map_bytes += pos
                self._regions_fill_data(-(-self._map_bytes // BLOCK))
                self._need -= pos
                self._state = _DATA if self._need else _HEADER
                return pos
        self._map_bytes += pos
        self._need -= pos
        if not self._need:
            self._refuse("its sparse map runs past the end of its data")
        return pos
