"""Streaming checks of tar member headers, done before GNU tar sees a member.

Restore hands plaintext to GNU tar, which is fast but trusts the archive. This
parser walks the same byte stream first: it reads only headers (data is
skipped by arithmetic), refuses a hostile or ambiguous member before any of
its bytes are forwarded, and keeps a map of every path so later members can be
judged against earlier ones (writing through a symlink, type changes, hard
links to unseen names).

Where GNU tar would read an archive differently from a simple reading (two
names for one member, a malformed pax record it silently skips, a number it
parses leniently, a sparse map that consumes a different number of blocks),
we refuse instead of guessing: GNU tar never writes such archives, so the
refusal costs nothing for real backups and removes any parser differential.
Python's tarfile is not used: 3.11.7 lacks the 2025 filter-bypass fixes.

A hard link may name an earlier regular file or an earlier symbolic link: GNU tar writes a hard-linked symlink
(as `cp -al` makes) as a hard-link member, and link(2) on a symlink links the symlink itself. The new name is a
symlink with the same target text, resolved from its own folder: it is checked as a symlink of its own.

Beyond GNU tar's own rules we refuse: a '..' component anywhere in a name,
an absolute symlink target, a symlink target whose '..' would climb out of the
extraction folder or out of anything but a directory (through a symlink it
would climb from wherever that link points; a folder not seen yet is promised
to be a directory, and a later member of that name that is not one is refused:
tar archives a folder's entries in directory order, so `sub` of `sub/../x` may
come after the link), and a second non-directory member with the same path
(replacing the first one changes what hard links mean).

Accepted type flags: '0', '\\0' and '7' (regular file), '1' (hard link), '2'
(symlink), '5' (directory), 'S' (old GNU sparse file, in GNU-format headers
only); 'x', 'g', 'L', 'K' are metadata the parser consumes itself. Everything
else (devices, FIFOs, GNU dumpdir/volume/multivolume headers, Solaris 'X',
vendor flags that GNU tar would extract as plain files) is refused.

Set-user-ID and set-group-ID bits are never handed to tar: a file or folder
whose mode has them is forwarded with a header rewritten without them (mode
and checksum, nothing else), and listed in `Listing.setid` so that the caller
can name it in a warning. A backup that happens to hold a setuid program can
still be restored; it comes back as an ordinary executable. (The mode is the
only place GNU tar reads permissions from: pax has no mode keyword, and
extended attributes such as file capabilities are never extracted.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .tarfields import BLOCK, _decimal, _is_star, _number, _pad, show
from .tarsparse import _DATA, _HEADER, _META, _SPARSE_1_0, _SPARSE_MAP, SparseMaps

ZERO_BLOCK = bytes(BLOCK)
GiB = 1 << 30
NAME_MAX = 255  # longest path component on ext4/xfs: refuse early rather than fail half-way in tar

DIR, FILE, HARDLINK, SYMLINK = 1, 2, 3, 4
KIND_NAMES = {DIR: "directory", FILE: "regular file", HARDLINK: "hard link", SYMLINK: "symbolic link"}
_TYPES = {b"0": FILE, b"\x00": FILE, b"7": FILE, b"1": HARDLINK, b"2": SYMLINK, b"5": DIR}
_REFUSED_TYPES = {b"3": "it is a character device", b"4": "it is a block device", b"6": "it is a FIFO",
                  b"D": "it is a GNU dumpdir", b"V": "it is a volume label", b"M": "it continues a multi-volume "
                  "archive", b"N": "it is an old GNU rename record", b"X": "it is a Solaris extended header"}
_DRIVE = re.compile(rb"[A-Za-z]:")
_PAX_LEN = re.compile(rb"([0-9]{1,19}) ")
# Keywords that change what or where a member is: each may appear once, and their values are checked.
_PAX_NAME_KEYS = {b"path", b"linkpath", b"size", b"GNU.sparse.name", b"GNU.sparse.major", b"GNU.sparse.minor",
                  b"GNU.sparse.realsize"}
# A global header applies to every later member; only keywords that cannot move or resize one are allowed.
_PAX_GLOBAL_OK = {b"atime", b"ctime", b"mtime", b"comment", b"charset", b"hdrcharset", b"uid", b"gid", b"uname",
                  b"gname"}

SETID = 0o6000  # S_ISUID | S_ISGID


class ArtifactError(ValueError):
    """An artifact cannot be used: missing, corrupt, truncated, tampered, wrong key, undecompressable.
    The message names the artifact and what is wrong."""


class ArchiveRefused(ArtifactError):
    """A tar member breaks a safety rule; the message names the member and the rule."""

    def __init__(self, message: str, *, member: str = "", rule: str = ""):
        super().__init__(message)
        self.member = member
        self.rule = rule


@dataclass
class Limits:
    max_members: int = 1_000_000
    max_member_size: int = 256 * GiB
    max_total_size: int = 2048 * GiB
    max_name: int = 4096
    max_pax_header: int = 1 << 20


@dataclass
class Listing:
    members: int = 0  # member headers (not counting pax/long-name headers)
    files: int = 0  # regular files (distinct paths)
    dirs: int = 0  # directories, including parents created implicitly
    symlinks: int = 0
    hardlinks: int = 0
    total_size: int = 0  # bytes of regular files (sparse files at their real size; hard links not again)
    # path (bytes, relative, normalised) → kind; what check_tree compares the extracted tree with.
    paths: dict | None = field(default=None, repr=False, compare=False)
    # (member name, archived mode) of each file or folder whose setuid/setgid bits were stripped, in archive order.
    setid: list = field(default_factory=list, compare=False)


class TarScanner(SparseMaps):
    """Feed plaintext in chunks; get back the pieces that are safe to hand to GNU tar.

    feed() raises ArchiveRefused for a hostile member before returning anything
    from the chunk that holds it; a member's header (with its pax/long-name
    headers) is held back until it has been checked. After the end-of-archive
    block, `ended` is True and feed() forwards nothing more: the block itself
    and a second zero block are returned so that tar sees a proper end.
    """

    def __init__(self, artifact: str = "archive", limits: Limits | None = None):
        self.artifact = artifact
        self.limits = limits or Limits()
        self.ended = False
        self.offset = 0  # stream offset of the next byte to parse
        self._state = _HEADER
        self._need = 0
        self._block = bytearray()  # a block split across chunks
        self._meta = bytearray()
        self._meta_type, self._meta_size, self._meta_name = b"", 0, b""
        self._pax: dict[bytes, bytes] | None = None
        self._longname: bytes | None = None
        self._longlink: bytes | None = None
        self._paths: dict[bytes, int] = {}
        self._link_targets: dict[bytes, bytes] = {}  # symlink path → its target, for hard links to symlinks
        self._promised_dirs: set[bytes] = set()  # unseen folders a symlink climbs out of: only ever directories
        self._members = self._total = 0
        self._last_parent: bytes | None = None
        self._held = bytearray()
        self._group_open = False
        self._member = b""  # the member being read, for messages
        self._block_at = 0
        # sparse bookkeeping: sizes in bytes and 512-byte blocks, and the 1.0 map being read
        self._realsize = self._stored_blocks = self._region_blocks = self._sparse_end = 0
        self._map_numbers: list[int] = []
        self._map_expected = self._map_bytes = 0
        self._map_line = b""
        self._setid: list[tuple[str, int]] = []
        # (stream offset, header block) to forward instead of the archive's own block: set-id bits stripped.
        self._patches: list[tuple[int, bytes]] = []

    # --- errors ------------------------------------------------------------------------
    def _refuse(self, rule: str, member: bytes | None = None):
        raw = self._member if member is None else member
        raise ArchiveRefused(f"{self.artifact}: member {show(raw)} refused: {rule}", member=show(raw)[1:-1],
                             rule=rule)

    # --- the stream --------------------------------------------------------------------
    def feed(self, data) -> list:
        if self.ended or not data:
            return []
        view = memoryview(data).cast("B")
        n, i = len(view), 0
        out: list = []
        # view[emit_from:group_start] is checked and goes out in one piece; view[group_start:] belongs to a
        # header group (pax/long-name headers and the member header) that is not checked yet. A group that
        # began in an earlier chunk has its first bytes in self._held, and emit_from is None until it passes.
        emit_from: int | None = None if self._group_open else 0
        group_start = 0
        while i < n:
            state = self._state
            if state == _DATA:
                take = min(self._need, n - i)
                i += take
                self._need -= take
                if not self._need:
                    self._state = _HEADER
                continue
            if state == _META:
                take = min(self._need, n - i)
                self._meta += view[i : i + take]
                i += take
                self._need -= take
                if not self._need:
                    self._state = _HEADER
                    self._end_meta()
                continue
            if state == _SPARSE_MAP:
                i += self._sparse_map(view, i, n)
                continue
            # _HEADER and _SPARSE_EXT consume whole blocks, possibly split across chunks.
            if state == _HEADER and not self._group_open and not self._block:
                group_start, self._group_open = i, True
            if self._block or n - i < BLOCK:
                take = min(BLOCK - len(self._block), n - i)
                self._block += view[i : i + take]
                i += take
                if len(self._block) < BLOCK:
                    break
                block = bytes(self._block)
                self._block.clear()
            else:
                block = bytes(view[i : i + BLOCK])
                i += BLOCK
            self._block_at = self.offset + i - BLOCK
            if self._header(block) if state == _HEADER else self._sparse_ext(block):
                self._group_open = False
                if emit_from is None:
                    out.append(bytes(self._held))
                    self._held = bytearray()
                    emit_from = 0
                if self.ended:
                    out.append(view[emit_from:i])
                    out.append(ZERO_BLOCK)  # a second zero block: tar sees a complete end of archive
                    self.offset += i
                    out = [p for p in out if len(p)]
                    return self._patched(out, extra=1) if self._patches else out
        if not self._group_open:
            if emit_from < n:
                out.append(view[emit_from:n])
        else:
            if emit_from is not None and emit_from < group_start:
                out.append(view[emit_from:group_start])
            self._held += view[group_start:n]
        self.offset += n
        return self._patched(out) if self._patches else out

    def _patched(self, out: list, *, extra: int = 0) -> list:
        """Put the rewritten header blocks in place of the archive's own in `out`, the pieces about to be
        forwarded: contiguous in the stream up to what is held back, but for `extra` pieces added at the end."""
        sent = self.offset - (len(self._held) if self._group_open else 0)
        pieces = out[: len(out) - extra]
        at = sent - sum(len(p) for p in pieces)
        result = []
        for piece in pieces:
            stop = at + len(piece)
            hits = [(off, blk) for off, blk in self._patches if off < stop and off + BLOCK > at]
            if hits:
                piece = bytearray(piece)
                for off, blk in hits:
                    lo, hi = max(off, at), min(off + BLOCK, stop)
                    piece[lo - at : hi - at] = blk[lo - off : hi - off]
            result.append(piece)
            at = stop
        self._patches = [(off, blk) for off, blk in self._patches if off + BLOCK > sent]
        return result + out[len(out) - extra :]

    def finish(self) -> Listing:
        """Call after the last chunk: the archive must have ended properly. Returns the listing."""
        if not self.ended:
            at = f"inside member {show(self._member)}" if self._member else "before its first member"
            if self._state == _HEADER and not self._block and not self._group_open:
                raise ArtifactError(f"{self.artifact}: the archive has no end-of-archive marker after member "
                                    f"{show(self._member)}: it is truncated")
            raise ArtifactError(f"{self.artifact}: the archive ends {at}: it is truncated")
        counts = {DIR: 0, FILE: 0, HARDLINK: 0, SYMLINK: 0}
        for kind in self._paths.values():
            counts[kind] += 1
        return Listing(members=self._members, files=counts[FILE], dirs=counts[DIR], symlinks=counts[SYMLINK],
                       hardlinks=counts[HARDLINK], total_size=self._total, paths=self._paths, setid=self._setid)

    # --- headers -----------------------------------------------------------------------
    def _header(self, block: bytes) -> bool:
        """One header block; True when it completes a checked member header (or ends the archive)."""
        usum = sum(block)
        if usum == 0:
            if self._pax is not None or self._longname is not None or self._longlink is not None:
                self._refuse("its extended header is followed by the end of the archive")
            self.ended = True
            return True
        raw_name = block[:100].split(b"\0", 1)[0]
        recorded = _number(block[148:156], octal_only=True)
        usum += 8 * 32 - sum(block[148:156])
        # GNU tar also accepts the sum of signed bytes (old BSD/Sun tars computed it that way).
        if recorded != usum and recorded != usum - 256 * sum(b >= 0x80 for b in block[:148] + block[156:]):
            self._refuse(f"bad header checksum at byte offset {self._block_at}", raw_name)
        size = _number(block[124:136])
        if size is None:
            self._refuse(f"its size field {show(block[124:136].rstrip(bytes(1)))} is not a valid number",
                         self._longname or raw_name)
        typeflag = block[156:157]
        if typeflag in (b"x", b"g", b"L", b"K"):
            cap = self.limits.max_pax_header if typeflag in (b"x", b"g") else self.limits.max_name + 1
            if size > cap:
                what = "pax header" if typeflag in (b"x", b"g") else "long name"
                self._refuse(f"its {what} is {size} bytes, more than the limit of {cap}", raw_name)
            self._meta_type, self._meta_size, self._meta_name = typeflag, size, raw_name
            self._meta = bytearray()
            self._need = _pad(size)
            if self._need:
                self._state = _META
            else:
                self._end_meta()
            return False
        return self._main_header(block, typeflag, raw_name, size)

    def _end_meta(self) -> None:
        data = bytes(self._meta[: self._meta_size])
        self._meta = bytearray()
        kind = self._meta_type
        if kind in (b"L", b"K"):
            value = data.split(b"\0", 1)[0]  # GNU tar reads the name as a C string
            if kind == b"L":
                if self._longname is not None:
                    self._refuse("two GNU long-name headers precede one member", value)
                self._longname = value
            else:
                if self._longlink is not None:
                    self._refuse("two GNU long-link headers precede one member", self._longname or b"")
                self._longlink = value
            return
        records = self._pax_records(data)
        if kind == b"g":
            for key, _ in records:
                if key not in _PAX_GLOBAL_OK:
                    self._refuse(f"a global pax header sets {show(key)}, which would apply to every later member",
                                 self._meta_name)
            return
        if self._pax is not None:
            self._refuse("two pax headers precede one member", self._meta_name)
        pax: dict[bytes, bytes] = {}
        for key, value in records:
            if key in _PAX_NAME_KEYS:
                if key in pax:
                    self._refuse(f"its pax header sets {show(key)} twice", pax.get(b"path", self._meta_name))
                pax[key] = value
            elif key.startswith((b"GNU.sparse.", b"GNU.dumpdir", b"GNU.volume.")):
                self._refuse(f"its pax header uses {show(key)}, which Kasa does not restore (only GNU sparse 1.0)",
                             pax.get(b"path", self._meta_name))
        self._pax = pax

    def _pax_records(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Strict pax records: GNU tar stops silently at a malformed one and extracts the member anyway,
        which would let a record we honour be one it ignores."""
        out, pos, n = [], 0, len(data)
        while pos < n:
            if data[pos] == 0 and not data[pos:].strip(b"\0"):
                break  # NUL padding after the last record
            m = _PAX_LEN.match(data, pos)
            end = pos + int(m.group(1)) if m else 0
            if not m or end > n or end <= m.end() or data[end - 1] != 0x0A:
                self._refuse(f"malformed pax header record at byte {pos} of its extended header", self._meta_name)
            record = data[m.end() : end - 1]
            eq = record.find(b"=")
            if eq <= 0 or b"\0" in record or record[0] in (0x20, 0x09):
                self._refuse(f"malformed pax header record at byte {pos} of its extended header", self._meta_name)
            out.append((record[:eq], record[eq + 1 :]))
            pos = end
        return out

    def _main_header(self, block: bytes, typeflag: bytes, raw_name: bytes, size: int) -> bool:
        ustar = block[257:263] == b"ustar\x00"
        oldgnu = block[257:265] == b"ustar  \x00"
        pax, self._pax = self._pax or {}, None
        longname, longlink, self._longname, self._longlink = self._longname, self._longlink, None, None
        # The effective name, with GNU tar's precedence; two sources of a name are refused, not ranked.
        if ustar and block[345]:
            raw_name = block[345:500].split(b"\0", 1)[0] + b"/" + raw_name
        # GNU tar lets GNU.sparse.name win over path (it writes both when the stand-in name is long).
        sources = [s for s in (longname, pax.get(b"GNU.sparse.name", pax.get(b"path"))) if s is not None]
        name = sources[0] if sources else raw_name
        self._member = name
        if len(sources) > 1:
            self._refuse("it carries two different names (GNU long name, pax path or sparse name)")
        if longlink is not None and b"linkpath" in pax:
            self._refuse("it carries two link targets (GNU long link and pax linkpath)")
        link = longlink if longlink is not None else pax.get(b"linkpath", block[157:257].split(b"\0", 1)[0])
        if ustar and _is_star(block):
            self._refuse("it uses the star header format, which Kasa does not restore")
        kind = _TYPES.get(typeflag)
        sparse = typeflag == b"S"
        if sparse:
            if not oldgnu or pax:
                self._refuse("an old GNU sparse member must have a GNU-format header and no pax header")
            kind = FILE
        if kind is None:
            why = _REFUSED_TYPES.get(typeflag)
            self._refuse(why or f"it has type flag {typeflag!r}, which Kasa does not restore")
        if b"size" in pax:
            size = _decimal(pax[b"size"])
            if size is None:  # GNU tar would ignore it and use the header's size: refuse rather than guess
                self._refuse(f"its pax size {show(pax[b'size'])} is not a valid number")
        sparse_keys = _SPARSE_1_0.intersection(pax)
        if sparse_keys:
            self._pax_sparse_header(pax, sparse_keys, typeflag, ustar)
        if kind != FILE and size:
            self._refuse(f"a {KIND_NAMES[kind]} with {size} bytes of data")
        realsize = size
        if sparse:
            realsize = _number(block[483:495])
            if realsize is None:
                self._refuse("its sparse real size is not a valid number")
        elif sparse_keys:
            realsize = _decimal(pax[b"GNU.sparse.realsize"])
        limits = self.limits
        if max(size, realsize) > limits.max_member_size:
            self._refuse(f"it is {max(size, realsize)} bytes, more than the limit of {limits.max_member_size}")
        self._members += 1
        if self._members > limits.max_members:
            self._refuse(f"the archive has more than {limits.max_members} members")

        parts = self._name_parts(name, "its name")
        if not parts:
            if kind != DIR:
                self._refuse("a name that is empty or the extraction folder itself")
        elif kind != DIR and (name.endswith(b"/") or name.endswith(b"/.")):
            self._refuse(f"a {KIND_NAMES[kind]} whose name ends with '/' (GNU tar would make it a directory)")
        key = b"/".join(parts)
        if parts:
            self._check_parents(parts, key)
            before = self._paths.get(key)
            if before is not None and not (before == DIR and kind == DIR):
                if before == kind or {before, kind} == {FILE, HARDLINK}:
                    self._refuse("it appears twice in the archive (a later copy would replace the earlier one)")
                self._refuse(f"it would replace the earlier {KIND_NAMES[before]} of the same name with a "
                             f"{KIND_NAMES[kind]}")
        if parts and kind != DIR and key in self._promised_dirs:
            self._refuse("an earlier symbolic link climbs out of this name with '..': it may only be a directory")
        if kind == SYMLINK:
            self._check_symlink(parts, link)
            self._link_targets[key] = link
        elif kind == HARDLINK:
            kind = self._check_hardlink(parts, key, link)
        elif kind == FILE:
            self._total += realsize
            if self._total > limits.max_total_size:
                self._refuse(f"the archive's files add up to more than the limit of {limits.max_total_size} bytes")
        if parts:
            self._paths[key] = kind
        self._strip_setid(block, kind)

        self._need = _pad(size)
        self._realsize, self._stored_blocks, self._region_blocks = realsize, self._need // BLOCK, 0
        self._sparse_end = 0
        if sparse:
            return self._oldgnu_sparse(block)
        if sparse_keys:
            self._map_numbers, self._map_expected, self._map_line, self._map_bytes = [], -1, b"", 0
            self._state = _SPARSE_MAP
            if not self._need:
                self._refuse("a sparse member without its sparse map")
        elif self._need:
            self._state = _DATA
        return True

    def _strip_setid(self, block: bytes, kind: int) -> None:
        """Forward a file's or folder's header without its setuid/setgid bits (see the module docstring)."""
        mode = _number(block[100:108])
        if mode is None:  # GNU tar would warn and extract it with some mode: refuse rather than guess which
            self._refuse(f"its mode field {show(block[100:108].rstrip(bytes(1)))} is not a valid number")
        if not mode & SETID or kind not in (FILE, DIR):
            return  # a link's own mode is never applied
        kept = mode & ~SETID  # other bits as they were: GNU tar reads the type bits some old tars write there
        new = bytearray(block)
        new[100:108] = b"%07o\0" % (kept if kept < 8**7 else kept & 0o7777)
        new[148:156] = b" " * 8
        new[148:156] = b"%06o\0 " % sum(new)
        self._patches.append((self._block_at, bytes(new)))
        self._setid.append((show(self._member)[1:-1], mode & 0o7777))

    # --- names -------------------------------------------------------------------------
    def _name_parts(self, raw: bytes, what: str, member: bytes | None = None) -> list[bytes]:
        if not raw:
            self._refuse(f"{what} is empty", member)
        if b"\0" in raw:
            self._refuse(f"{what} contains a NUL byte", member)
        if len(raw) > self.limits.max_name:
            self._refuse(f"{what} is {len(raw)} bytes, longer than the limit of {self.limits.max_name}", member)
        if raw.startswith(b"/"):
            self._refuse(f"{what} is an absolute path", member)
        if _DRIVE.match(raw):
            self._refuse(f"{what} starts with a Windows drive", member)
        parts = [p for p in raw.split(b"/") if p and p != b"."]
        if b".." in parts:
            self._refuse(f"{what} has a '..' component", member)
        if any(len(p) > NAME_MAX for p in parts):
            self._refuse(f"{what} has a component longer than {NAME_MAX} bytes", member)
        return parts

    def _check_parents(self, parts: list[bytes], key: bytes) -> None:
        parent = key.rpartition(b"/")[0]
        if not parent or parent == self._last_parent:
            return  # a folder once seen as a directory stays one (type changes are refused)
        paths = self._paths
        for k in range(1, len(parts)):
            prefix = b"/".join(parts[:k])
            kind = paths.get(prefix)
            if kind is None:
                paths[prefix] = DIR  # GNU tar creates missing parents
            elif kind == SYMLINK:
                self._refuse(f"it would be written through the symbolic link {show(prefix)}")
            elif kind != DIR:
                self._refuse(f"it would be placed inside {show(prefix)}, which is a {KIND_NAMES[kind]}")
        self._last_parent = parent

    def _check_symlink(self, parts: list[bytes], target: bytes) -> None:
        """Lexical resolution from the link's folder. '..' may climb only out of real folders: through a symlink it
        would climb from wherever the link points. A folder of the target not seen yet (tar archives a folder's
        entries in directory order, so `sub` of `sub/../x` may come later) is promised to be one: a later member
        of that name that is not a directory is refused (_promised_dirs)."""
        if not target:
            self._refuse("a symbolic link with an empty target")
        if b"\0" in target or len(target) > self.limits.max_name:
            self._refuse("its symbolic link target contains a NUL byte or is too long")
        if target.startswith(b"/") or _DRIVE.match(target):
            self._refuse(f"its symbolic link target {show(target)} is absolute")
        stack = parts[:-1]
        base = len(stack)  # the link's own folders: directories of this archive (_check_parents made sure)
        for p in target.split(b"/"):
            if not p or p == b".":
                continue
            if p != b"..":
                stack.append(p)
                continue
            if not stack:
                self._refuse(f"its symbolic link target {show(target)} points outside the extraction folder")
            promise = []
            for k in range(max(base, 1), len(stack) + 1):  # each folder the target entered on its way down
                prefix = b"/".join(stack[:k])
                kind = self._paths.get(prefix)
                if kind is None:
                    promise.append(prefix)
                elif kind != DIR:
                    self._refuse(f"its symbolic link target {show(target)} climbs with '..' out of {show(prefix)}, "
                                 f"which is a {KIND_NAMES[kind]} of this archive, not a directory")
            self._promised_dirs.update(promise)
            stack.pop()
            base = min(base, len(stack))

    def _check_hardlink(self, parts: list[bytes], key: bytes, target: bytes) -> int:
        """The kind the new name gets: HARDLINK (to a regular file) or SYMLINK (to a symlink, which it becomes)."""
        tparts = self._name_parts(target, f"its hard link target {show(target)}")
        tkey = b"/".join(tparts)
        if tkey == key:
            self._refuse("a hard link to itself")
        before = self._paths.get(tkey)
        if before == SYMLINK:
            # The same target text, read from this name's folder: a link that stays inside from a deep folder may
            # leave the extraction folder from a shallow one.
            self._check_symlink(parts, self._link_targets[tkey])
            self._link_targets[key] = self._link_targets[tkey]
            return SYMLINK
        if before not in (FILE, HARDLINK):
            self._refuse(f"its hard link target {show(target)} is not a regular file or symbolic link that appears "
                         "earlier in the archive")
        return HARDLINK
