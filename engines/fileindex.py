"""File indexes and change lists: what a differential backup of a folder needs (docs/FORMAT.md, "Chains").

A **full** backup of a service folder stores, beside its tar artifact, an *index*: one record per path that
tar archived (type, mode, owner, size, mtime, ctime and inode), in the order GNU tar writes the archive with
`--sort=name` (each folder's entries sorted by their bytes, a folder before its contents). A **differential**
walks the folder again, merges the walk with the full's index (both in that order, so nothing is held in
memory but one record of each and the folder being listed), and writes

- the *member list*: every path new or changed since the full, for `tar --no-recursion --null --files-from`;
- the *change list*: each such path marked `+` (new, or changed in place) or `R` (replaced by another type),
  and each path gone since the full marked `-` (only the topmost of a removed folder).

A restore streams the full's archive without the members the change list names (and without anything under a
`-` or `R` folder), then the differential's archive: one tar stream of the tree as it was at the
differential's moment (engines.tarmerge).

A path counts as changed when any of type, mode, uid, gid, size, mtime, ctime or inode differ, as GNU tar's
own `--listed-incremental` decides (ctime catches a file rewritten with its old mtime and a hard link added or
removed). Pure Python, no Django: it runs on the worker, and is testable alone.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

INDEX_MAGIC = b"kasa-file-index 1"
CHANGES_MAGIC = b"kasa-change-list 1"

# Kinds as one letter; sockets are left out (tar skips them with a warning), as are other types tar cannot store.
_KINDS = {stat.S_IFREG: b"f", stat.S_IFDIR: b"d", stat.S_IFLNK: b"l", stat.S_IFIFO: b"p", stat.S_IFCHR: b"c",
          stat.S_IFBLK: b"b"}


class IndexError_(ValueError):
    """A malformed index or change list (an artifact Kasa did not write, or a bug)."""


class Entry(tuple):
    """(path, meta): `path` as tar names the member, relative to the backup root, without a trailing '/';
    `meta` b"<kind> <mode> <uid> <gid> <size> <mtime_ns> <ctime_ns> <ino>". A tuple: tens of thousands are made
    per backup, and a tuple costs a fraction of a dataclass."""

    __slots__ = ()

    def __new__(cls, path: bytes, meta: bytes):
        return tuple.__new__(cls, (path, meta))

    @property
    def path(self) -> bytes:
        return self[0]

    @property
    def meta(self) -> bytes:
        return self[1]

    @property
    def kind(self) -> bytes:
        return self[1][:1]


def key(path: bytes) -> tuple[bytes, ...]:
    """The order of GNU tar --sort=name: component by component, each compared as bytes (strcmp)."""
    return tuple(path.split(b"/"))


def under(path: bytes, folder: bytes) -> bool:
    return path.startswith(folder + b"/")


# --- excludes, as GNU tar applies --exclude -------------------------------------------------------
def exclude_matcher(patterns: Iterable[str]):
    """A predicate on member names equal to GNU tar's default --exclude: wildcards that match '/', not anchored
    (a pattern matches the whole name or any part of it that starts after a '/')."""
    pats = [p for p in patterns if p]
    if not pats:
        return lambda name: False
    body = "|".join(f"(?:{fnmatch.translate(p)[4:-3]})" for p in pats)  # translate() gives (?s:...)\Z
    rx = re.compile(os.fsencode(f"(?s:(?:.*/)?(?:{body}))\\Z"))  # names are bytes: the UTF-8 of a pattern
    return lambda name: rx.match(name) is not None


# --- walking --------------------------------------------------------------------------------------
def _meta(st: os.stat_result) -> bytes | None:
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        return None
    return b"%s %o %d %d %d %d %d %d" % (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                         st.st_size if kind == b"f" else 0, st.st_mtime_ns, st.st_ctime_ns,
                                         st.st_ino)


def walk(root: str | bytes, member: str | bytes, *, excludes: Iterable[str] = ()) -> Iterator[Entry]:
    """Every path under root/member that `tar --create --sort=name --directory root member` archives, in that
    order, with its metadata. `member` is the name given to tar ("backend", or "." for the root itself).

    Depth first with an explicit stack of sorted listings (a generator per folder would cost a resumption per
    level for every entry); memory: the listings of the folders on the current path."""
    root_b = os.fsencode(root)
    top = os.fsencode(member).rstrip(b"/") or b"."
    excluded = exclude_matcher(excludes)
    name = _normal(top)
    try:
        st = os.lstat(os.path.join(root_b, top))
    except FileNotFoundError:
        return  # nothing to index; tar says what is missing, as it always did
    meta = _meta(st)
    if meta is None or (name and excluded(name)):
        return
    yield Entry(name, meta)
    if meta[:1] != b"d":
        return
    stack = [(_listing(os.path.join(root_b, top)), name)]
    while stack:
        entries, prefix = stack[-1]
        if not entries:
            stack.pop()
            continue
        e = entries.pop()
        child = prefix + b"/" + e.name if prefix else e.name
        if excluded(child):
            continue
        try:
            meta = _meta(e.stat(follow_symlinks=False))
        except OSError:
            continue  # gone since the listing: tar would not archive it either
        if meta is None:
            continue
        yield Entry(child, meta)
        if meta[:1] == b"d":
            stack.append((_listing(e.path), child))


def _listing(path: bytes) -> list:
    """A folder's entries, last name first (popped from the end: name order)."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=_by_name, reverse=True)
    except OSError:
        return []  # tar warns about an unreadable folder and goes on; so does the index


def _by_name(e: os.DirEntry) -> bytes:
    return e.name


def _normal(name: bytes) -> bytes:
    while name.startswith(b"./"):
        name = name[2:]
    return b"" if name == b"." else name


# --- serialising ----------------------------------------------------------------------------------
def index_records(entries: Iterable[Entry]) -> Iterator[bytes]:
    """The index as bytes: a magic record, then `meta TAB path NUL` per entry (a path holds any byte but NUL)."""
    yield INDEX_MAGIC + b"\0"
    for e in entries:
        yield e.meta + b"\t" + e.path + b"\0"


def _records(chunks: Iterable[bytes]) -> Iterator[bytes]:
    tail = b""
    for chunk in chunks:
        data = tail + bytes(chunk)
        parts = data.split(b"\0")
        tail = parts.pop()
        yield from parts
    if tail:
        raise IndexError_("it ends in the middle of a record")


def read_index(chunks: Iterable[bytes]) -> Iterator[Entry]:
    """Entries of an index, checked: the magic, each record's form, and the order (strictly increasing)."""
    records = _records(chunks)
    if next(records, None) != INDEX_MAGIC:
        raise IndexError_("it is not a Kasa file index")
    last = None
    for rec in records:
        meta, tab, path = rec.partition(b"\t")
        if not tab or meta.count(b" ") != 7 or meta[:1] not in b"fdlpcb":
            raise IndexError_(f"malformed record {rec[:80]!r}")
        k = path.split(b"/")
        if last is not None and k <= last:
            raise IndexError_(f"records out of order at {path[:200]!r}")
        last = k
        yield Entry(path, meta)


# --- the differential -----------------------------------------------------------------------------
@dataclass
class Changes:
    added: int = 0  # new paths
    changed: int = 0  # changed in place, or replaced by another type
    deleted: int = 0  # topmost paths gone
    bytes: int = 0  # file bytes of what the differential archives
    unchanged: int = 0


def compare(base: Iterable[Entry], current: Iterable[Entry]) -> Iterator[tuple[bytes, bytes, Entry | None]]:
    """Merge two ordered streams; yields (op, path, current entry) for each path: op b"N" (new), b"+" (changed
    in place), b"R" (replaced by another type: the base's entry and all under it go), b"-" (gone, with all under
    it; only the topmost path is yielded) or b"=" (unchanged)."""
    b_it, c_it = iter(base), iter(current)
    b, c = next(b_it, None), next(c_it, None)
    gone: bytes | None = None  # a base folder deleted or replaced: skip the base's entries under it
    while b is not None or c is not None:
        if b is not None and c is not None and b[0] == c[0]:  # the common case first: the same path
            if b[1] == c[1]:
                yield b"=", c[0], c
            elif b[1][:1] != c[1][:1]:
                yield b"R", c[0], c
                gone = b[0]
            else:
                yield b"+", c[0], c
            b, c = next(b_it, None), next(c_it, None)
            continue
        if b is not None and gone is not None and under(b.path, gone):
            b = next(b_it, None)
            continue
        if c is None or (b is not None and key(b.path) < key(c.path)):
            yield b"-", b.path, None
            gone = b.path
            b = next(b_it, None)
        elif b is None or key(c.path) < key(b.path):
            yield b"N", c.path, c
            c = next(c_it, None)
        else:
            if b.kind != c.kind:
                yield b"R", c.path, c
                gone = b.path
            elif b.meta != c.meta:
                yield b"+", c.path, c
            else:
                yield b"=", c.path, c
            b, c = next(b_it, None), next(c_it, None)


def write_differential(base: Iterable[Entry], current: Iterable[Entry], members_out, changes_out) -> Changes:
    """Write the member list (NUL-separated paths, for tar) and the change list (magic, then `op path NUL`);
    returns the counts."""
    counts = Changes()
    changes_out.write(CHANGES_MAGIC + b"\0")
    for op, path, entry in compare(base, current):
        if op == b"=":
            counts.unchanged += 1
            continue
        changes_out.write((b"+" if op == b"N" else op) + path + b"\0")
        if op == b"-":
            counts.deleted += 1
            continue
        members_out.write((path or b".") + b"\0")
        if entry is not None and entry.kind == b"f":
            counts.bytes += int(entry.meta.split(b" ")[4])
        if op == b"N":
            counts.added += 1
        else:
            counts.changed += 1
    return counts


def read_changes(chunks: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """(op, path) of a change list, checked: the magic, the ops and the order."""
    records = _records(chunks)
    if next(records, None) != CHANGES_MAGIC:
        raise IndexError_("it is not a Kasa change list")
    last = None
    for rec in records:
        op, path = rec[:1], rec[1:]
        if op not in (b"+", b"-", b"R"):
            raise IndexError_(f"malformed change record {rec[:80]!r}")
        k = key(path)
        if last is not None and k <= last:
            raise IndexError_(f"change records out of order at {path[:200]!r}")
        last = k
        yield op, path


# --- in a process of its own ------------------------------------------------------------------------
# A walk is tens of thousands of lstat calls and as many small Python steps. In the worker's own process the
# lanes of a backup take turns on one interpreter lock; in a child (the standard library only, ~40 ms to
# start) two services are walked on two cores at once, and the worker's other lane keeps its own.
_CHILD = "import sys; sys.path.insert(0, {path!r}); from engines.fileindex import _main; _main(sys.argv[1])"
_CHILD_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}


def _spawn(spec: dict, stdin) -> subprocess.Popen:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen([sys.executable, "-S", "-c", _CHILD.format(path=here), json.dumps(spec)],
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_CHILD_ENV,
                            close_fds=True)


def _finish(proc: subprocess.Popen) -> bytes:
    out, err = proc.communicate()
    if proc.returncode == 3:
        raise IndexError_(err.decode("utf-8", "replace").strip())
    if proc.returncode != 0:
        raise OSError(f"the file walk failed (exit code {proc.returncode}): "
                      f"{err.decode('utf-8', 'replace').strip()[-500:]}")
    return out


def write_index_file(root: str, member: str, out_path: str, *, excludes: Iterable[str] = ()) -> None:
    """The folder's index into out_path, walked in a child process."""
    _finish(_spawn({"mode": "index", "root": root, "member": member, "excludes": list(excludes),
                    "out": out_path}, subprocess.DEVNULL))


def write_differential_files(root: str, member: str, base_chunks: Iterable[bytes], members_path: str,
                             changes_path: str, *, excludes: Iterable[str] = ()) -> Changes:
    """write_differential() in a child process, fed the full's index (plaintext chunks) on its stdin."""
    proc = _spawn({"mode": "differential", "root": root, "member": member, "excludes": list(excludes),
                   "members": members_path, "changes": changes_path}, subprocess.PIPE)
    try:
        for chunk in base_chunks:
            proc.stdin.write(chunk)
    except BrokenPipeError:
        pass  # the child stopped reading: its exit code says why
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        proc.stdin = None  # closed: communicate() must not flush it
    return Changes(**json.loads(_finish(proc)))


def _main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    entries = walk(spec["root"], spec["member"], excludes=spec["excludes"])
    try:
        if spec["mode"] == "index":
            with open(spec["out"], "wb", buffering=1 << 20) as out:
                for rec in index_records(entries):
                    out.write(rec)
            return
        stdin = iter(lambda: sys.stdin.buffer.read(1 << 20), b"")
        with open(spec["members"], "wb", buffering=1 << 20) as m, open(spec["changes"], "wb", buffering=1 << 20) as c:
            counts = write_differential(read_index(stdin), entries, m, c)
        sys.stdout.write(json.dumps(counts.__dict__))
    except IndexError_ as exc:
        sys.stderr.write(str(exc))
        sys.exit(3)
