"""Count each table's rows in a mysqldump / mariadb-dump stream while passing the stream on unchanged.

Why: MySQL cannot hand one consistent snapshot to a second connection the way
PostgreSQL exports one, so rows counted by a separate query, even just before a
`--single-transaction` dump, differ from the dump whenever the application writes
meanwhile, and the restore check (row counts must match the manifest) would then
refuse a good backup. Counting the rows in the dump itself gives exactly what a
restore loads.

It runs as a stage of the backup chain, between the dump and the compressor,
stdlib only (no Django, no package import):

    python -I -S engines/sqlcount.py COUNTS.json   < dump.sql > dump.sql

and writes {"table": rows} to COUNTS.json once the input ends cleanly.

What it relies on (mysqldump's own output, with Kasa's flags: extended inserts,
--hex-blob, no --complete-insert): every statement starts at the beginning of a
line; a data row is one `(...)` group of an `INSERT INTO \\`t\\` VALUES` line; string
values are single-quoted with backslash escapes and never hold a raw newline; a
base table's structure starts with a `CREATE TABLE \\`t\\`` line. Lines inside a
`DELIMITER ;;` block (trigger, routine and event bodies) are code, not data.
Memory stays bounded: an over-long INSERT line (one huge row) is scanned in
pieces instead of being held whole.
"""

from __future__ import annotations

import json
import os
import re
import sys

CHUNK = 1 << 20
LINE_LIMIT = 16 << 20  # longer INSERT lines are scanned piece by piece
_STRING = re.compile(rb"'(?:[^'\\]|\\.)*'", re.S)
_NAME = re.compile(rb"`((?:[^`]|``)*)`")
_OUTSIDE = re.compile(rb"[('\n]")  # outside a string: a row opens, a string opens, or the line ends
_INSIDE = re.compile(rb"['\\]")  # inside a string: its end, or an escape


class RowCounter:
    """Feed it the dump in chunks of any size; `counts` holds rows per table.

    An INSERT statement may span lines (mariadb-dump puts each row on its own line, mysqldump all of
    them on one); it ends at a line whose last character outside strings is ';'.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._line = bytearray()  # the current line, while it is short enough to hold
        self._insert: str | None = None  # the table of the INSERT statement in progress
        self._long = False  # scanning an over-long line piece by piece
        self._skip = False  # ... that is not data
        self._in_string = self._escape = False
        self._last = b""  # last character outside strings on the over-long line
        self._delimiter = b";"

    def feed(self, data: bytes | memoryview) -> None:
        data = bytes(data)
        pos, n = 0, len(data)
        while pos < n:
            if self._long:
                pos = self._scan(data, pos)
                continue
            end = data.find(b"\n", pos)
            if end < 0:
                self._line += data[pos:]
                if len(self._line) > LINE_LIMIT:
                    self._spill()
                return
            self._line += data[pos:end]
            pos = end + 1
            self._complete(bytes(self._line))
            self._line.clear()

    def close(self) -> dict[str, int]:
        if self._line:
            self._complete(bytes(self._line))
            self._line.clear()
        return self.counts

    def _complete(self, line: bytes) -> None:
        if self._insert is not None:  # a continuation line of an INSERT
            self._rows(self._insert, line)
        elif line.startswith(b"DELIMITER "):
            self._delimiter = line[10:].strip() or b";"
        elif self._delimiter != b";":
            return  # the body of a trigger, routine or event
        elif line.startswith(b"INSERT INTO `"):
            name, rest = self._name(line, 12)
            if name is not None:
                self.counts.setdefault(name, 0)
                self._insert = name
                self._rows(name, rest)
        elif line.startswith(b"CREATE TABLE `"):
            name, _ = self._name(line, 13)
            if name is not None:
                self.counts.setdefault(name, 0)

    def _rows(self, table: str, part: bytes) -> None:
        """Count the rows that open in part (strings removed); end the statement at a final ';'."""
        bare = _STRING.sub(b"", part)
        self.counts[table] += bare.count(b"(")
        if bare.rstrip().endswith(b";"):
            self._insert = None

    @staticmethod
    def _name(line: bytes, at: int) -> tuple[str | None, bytes]:
        m = _NAME.match(line, at)
        if not m:
            return None, b""
        return m.group(1).replace(b"``", b"`").decode("utf-8", "surrogateescape"), line[m.end():]

    def _spill(self) -> None:
        """The line outgrew LINE_LIMIT: count what is held, then go on scanning piece by piece."""
        line = bytes(self._line)
        self._line.clear()
        self._long, self._in_string, self._escape, self._last = True, False, False, b""
        rest = line
        if self._insert is None:
            name = None
            if self._delimiter == b";" and line.startswith(b"INSERT INTO `"):
                name, rest = self._name(line, 12)
            elif self._delimiter == b";" and line.startswith(b"CREATE TABLE `"):
                self._complete(line)  # its name is all we need from it
            if name is None:  # not data (or not a name we can read): skip to the end of the line
                self._skip = True
                return
            self.counts.setdefault(name, 0)
            self._insert = name
        self._skip = False
        self._scan(rest, 0)

    def _scan(self, data: bytes, pos: int) -> int:
        """Scan an over-long line from pos; return where the next line starts (or len(data))."""
        n = len(data)
        if self._skip:
            end = data.find(b"\n", pos)
            if end < 0:
                return n
            self._long = False
            return end + 1
        while pos < n:
            if self._escape:
                self._escape = False
                pos += 1
            elif self._in_string:
                m = _INSIDE.search(data, pos)
                if not m:
                    return n
                pos = m.end()
                if m.group() == b"\\":
                    self._escape = True
                else:
                    self._in_string = False
            else:
                m = _OUTSIDE.search(data, pos)
                seg = data[pos:m.start() if m else n].rstrip()
                if seg:
                    self._last = seg[-1:]
                if not m:
                    return n
                pos = m.end()
                c = m.group()
                if c == b"(":
                    self.counts[self._insert] += 1
                    self._last = c
                elif c == b"'":
                    self._in_string, self._last = True, c
                else:  # the line ended: so did the statement if its last character was ';'
                    self._long = False
                    if self._last == b";":
                        self._insert = None
                    return pos
        return n


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: sqlcount.py COUNTS.json  (dump on stdin, passed on to stdout)", file=sys.stderr)
        return 2
    counter = RowCounter()
    src, dst = sys.stdin.buffer.raw, sys.stdout.buffer.raw
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n := src.readinto(buf):
        counter.feed(view[:n])
        out = view[:n]
        while out:
            out = out[dst.write(out):]
    counts = counter.close()
    tmp = argv[1] + ".part"
    with open(tmp, "w") as fh:
        json.dump(counts, fh)
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except BrokenPipeError:  # the next stage stopped reading: it reports why
        sys.exit(1)
