"""engines.fileindex and engines.tarmerge alone: GNU tar's own archives, no Django.

A full archive (tar --sort=name) and its index; the tree changes in every way a differential must carry (new,
changed, deleted files and folders, type changes, hard links, symbolic links, modes, empty folders); the
differential archive of the member list; the merged stream extracted by tar gives exactly the changed tree."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import time

import pytest

from engines import fileindex, tarmerge
from engines.tarcheck import TarScanner

TAR = ["tar", "--create", "--file=-", "--format=posix", "--pax-option=delete=atime,delete=ctime,delete=mtime",
       "--sparse"]


def _digest(root: str) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("l", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("d", oct(st.st_mode & 0o7777))
            else:
                out[rel] = ("f", oct(st.st_mode & 0o7777), int(st.st_mtime),
                            hashlib.sha256(open(p, "rb").read()).hexdigest(), st.st_ino)
    # hard-link groups, by name, instead of inode numbers
    groups: dict = {}
    for rel, v in out.items():
        if v[0] == "f":
            groups.setdefault(v[4], []).append(rel)
    return {rel: (v[:4] if v[0] == "f" else v) for rel, v in out.items()} | {
        "links": sorted(sorted(g) for g in groups.values() if len(g) > 1)}


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _tar(root: str, argv: list[str], stdin=None) -> bytes:
    return subprocess.run(TAR + ["--directory", root, *argv], input=stdin, capture_output=True,
                          check=True).stdout


def _full(root: str, member: str):
    index = b"".join(fileindex.index_records(fileindex.walk(root, member)))
    archive = _tar(root, ["--sort=name", "--", member])
    return archive, index


def _differential(root: str, member: str, index: bytes):
    members, changes = io.BytesIO(), io.BytesIO()
    counts = fileindex.write_differential(fileindex.read_index([index]), fileindex.walk(root, member),
                                          members, changes)
    archive = _tar(root, ["--no-recursion", "--null", "--files-from=-"], stdin=members.getvalue())
    return archive, changes.getvalue(), counts


def _extract(stream: bytes, dest: str) -> None:
    os.makedirs(dest)
    scanner = TarScanner("merged")
    for _ in scanner.feed(stream):
        pass
    subprocess.run(["tar", "--extract", "--file=-", "--preserve-permissions", "--delay-directory-restore",
                    "--directory", dest], input=stream, check=True)


def _chunks(data: bytes, n: int = 7000):
    return [data[i:i + n] for i in range(0, len(data), n)]


def _merged(full: bytes, changes: bytes, diff: bytes) -> bytes:
    return b"".join(bytes(p) for p in tarmerge.merge(_chunks(full), fileindex.read_changes(_chunks(changes, 13)),
                                                     _chunks(diff)))


def test_full_plus_differential_gives_the_tree_of_the_differential(tmp_path):
    root = str(tmp_path / "root")
    svc = os.path.join(root, "backend")
    _write(f"{svc}/keep.txt", b"same" * 1000)
    _write(f"{svc}/change.txt", b"old")
    _write(f"{svc}/gone.txt", b"bye")
    _write(f"{svc}/gone-dir/a/b.txt", b"x")
    _write(f"{svc}/file-to-dir", b"was a file")
    _write(f"{svc}/dir-to-file/inner.txt", b"was in a folder")
    _write(f"{svc}/linked/one", b"shared")
    os.link(f"{svc}/linked/one", f"{svc}/linked/two")
    os.symlink("keep.txt", f"{svc}/link-to-keep")
    os.makedirs(f"{svc}/empty-kept")
    _write(f"{svc}/mode.txt", b"m", 0o644)
    _write(f"{svc}/logs/app.log", b"excluded")
    _write(f"{svc}/a b", b"space sorts before '/'")
    _write(f"{svc}/a/x", b"in a")
    full, index = _full(root, "backend")
    time.sleep(0.01)

    _write(f"{svc}/change.txt", b"new content, longer")
    os.remove(f"{svc}/gone.txt")
    subprocess.run(["rm", "-rf", f"{svc}/gone-dir", f"{svc}/dir-to-file"], check=True)
    os.remove(f"{svc}/file-to-dir")
    _write(f"{svc}/file-to-dir/now.txt", b"now a folder")
    _write(f"{svc}/dir-to-file", b"now a file")
    _write(f"{svc}/new/deep/file.bin", os.urandom(5000))
    os.makedirs(f"{svc}/new-empty")
    os.link(f"{svc}/keep.txt", f"{svc}/keep-hardlink")  # a new link to an unchanged file: both travel
    os.chmod(f"{svc}/mode.txt", 0o600)
    os.remove(f"{svc}/link-to-keep")
    os.symlink("change.txt", f"{svc}/link-to-keep")
    _write(f"{svc}/été.txt", b"utf-8 name")
    expected = _digest(svc)

    diff, changes, counts = _differential(root, "backend", index)
    assert counts.deleted >= 2 and counts.added >= 4 and counts.changed >= 3
    in_diff = subprocess.run(["tar", "--list", "--quoting-style=literal", "--file=-"], input=diff,
                             capture_output=True, check=True).stdout.splitlines()
    assert b"backend/a/x" not in in_diff and b"backend/change.txt" in in_diff  # unchanged files stay behind
    dest = str(tmp_path / "out")
    _extract(_merged(full, changes, diff), dest)
    assert _digest(os.path.join(dest, "backend")) == expected


def test_unchanged_tree_gives_an_empty_differential(tmp_path):
    root = str(tmp_path)
    _write(f"{root}/svc/a/b.txt", b"b")
    _write(f"{root}/svc/c.txt", b"c")
    full, index = _full(root, "svc")
    members, changes = io.BytesIO(), io.BytesIO()
    counts = fileindex.write_differential(fileindex.read_index([index]), fileindex.walk(root, "svc"), members,
                                          changes)
    assert members.getvalue() == b"" and counts.unchanged == 4
    assert list(fileindex.read_changes([changes.getvalue()])) == []


def test_walk_follows_tar_sort_order_and_excludes(tmp_path):
    root = str(tmp_path)
    for name in ["a/x", "a/b/y", "a.txt", "a-b", "a b", "A", "a/logs/z.log", "a/q.log", b"\xff-raw".decode(
            "utf-8", "surrogateescape")]:
        _write(os.path.join(root, "s", name), b"1")
    excludes = ["logs", "log", "*.log"]
    walked = [e.path for e in fileindex.walk(root, "s", excludes=excludes)]
    listed = subprocess.run(["tar", "--create", "--file=-", "--sort=name", "--directory", root,
                             *[f"--exclude={p}" for p in excludes], "s"], capture_output=True,
                            check=True).stdout
    names = subprocess.run(["tar", "--list", "--quoting-style=literal", "--file=-"], input=listed,
                           capture_output=True, check=True).stdout
    assert walked == [n.rstrip(b"/") for n in names.splitlines()]


def test_merge_refuses_a_full_not_in_name_order(tmp_path):
    root = str(tmp_path)
    for name in ["s/b", "s/a", "s/c"]:
        _write(os.path.join(root, name), b"1")
    unsorted = _tar(root, ["--no-recursion", "--", "s", "s/c", "s/a"])
    with pytest.raises(tarmerge.MergeError, match="not in name order"):
        b"".join(bytes(p) for p in tarmerge.merge([unsorted], iter([]), [b""]))


def test_change_list_out_of_order_is_refused():
    data = fileindex.CHANGES_MAGIC + b"\0+b\0+a\0"
    with pytest.raises(fileindex.IndexError_, match="out of order"):
        list(fileindex.read_changes([data]))


def test_index_that_is_not_one_is_refused():
    with pytest.raises(fileindex.IndexError_, match="not a Kasa file index"):
        list(fileindex.read_index([b"hello\0"]))


def test_the_walk_in_a_child_process_writes_the_same_lists(tmp_path):
    """Large folders are walked in a child process (engines.fileindex.write_index_file / write_differential_files):
    the same index, member and change lists as in the worker's own process, and a bad index is refused."""
    root = str(tmp_path / "root")
    _write(f"{root}/svc/a/b.txt", b"b")
    _write(f"{root}/svc/c.txt", b"c")
    _write(f"{root}/svc/logs/x.log", b"excluded")
    index = str(tmp_path / "index")
    fileindex.write_index_file(root, "svc", index, excludes=["logs"])
    here = b"".join(fileindex.index_records(fileindex.walk(root, "svc", excludes=["logs"])))
    assert open(index, "rb").read() == here
    time.sleep(0.01)
    _write(f"{root}/svc/c.txt", b"changed")
    _write(f"{root}/svc/new.txt", b"new")
    members, changes = str(tmp_path / "members"), str(tmp_path / "changes")
    counts = fileindex.write_differential_files(root, "svc", _chunks(here, 50), members, changes,
                                                excludes=["logs"])
    m, c = io.BytesIO(), io.BytesIO()
    same = fileindex.write_differential(fileindex.read_index([here]), fileindex.walk(root, "svc", excludes=["logs"]),
                                        m, c)
    assert (counts.added, counts.changed) == (same.added, same.changed) == (1, 2)  # new.txt; c.txt and svc/
    assert open(members, "rb").read() == m.getvalue() and open(changes, "rb").read() == c.getvalue()
    with pytest.raises(fileindex.IndexError_, match="not a Kasa file index"):
        fileindex.write_differential_files(root, "svc", [b"garbage\0"], members, changes)
