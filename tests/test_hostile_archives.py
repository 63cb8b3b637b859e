"""Hostile and ambiguous tar archives are refused before GNU tar writes anything (engines/unpack.py, tarcheck.py).

Each archive is crafted with raw headers (or tarfile), stored through the real path (cat → encryption →
LocalStore) and then both verified and extracted. The refusal must name the member; the staging folder
must be gone; the live folder beside it and everything around it must be byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from engines import sources
from engines.artifact import write_artifact
from engines.backupcrypto import KeyRing
from engines.stores.local import LocalStore
from engines.streams import ProcessChain, Stage
from engines.tarcheck import TarScanner
from engines.unpack import ArchiveRefused, ArtifactError, Limits, extract_artifact, verify_artifact
from tests.test_unpack import children

pytestmark = pytest.mark.smoke

KEY = "kid1:" + "h" * 40
BLOCK_SIZE = 512


# --- crafting -----------------------------------------------------------------------------------
def octal(value: int, width: int) -> bytes:
    return (b"%0*o" % (width - 1, value)) + b"\0"


def header(name: bytes | str, *, type_: bytes = b"0", size: int = 0, link: bytes | str = b"", mode: int = 0o644,
           size_field: bytes | None = None, magic: bytes = b"ustar\x0000", prefix: bytes = b"",
           bad_checksum: bool = False, devmajor: int = 0) -> bytes:
    name = name.encode() if isinstance(name, str) else name
    link = link.encode() if isinstance(link, str) else link
    h = bytearray(512)
    h[0:100] = name[:100].ljust(100, b"\0")
    h[100:108] = octal(mode, 8)
    h[108:116] = octal(0, 8)
    h[116:124] = octal(0, 8)
    h[124:136] = size_field if size_field is not None else octal(size, 12)
    h[136:148] = octal(1_700_000_000, 12)
    h[156:157] = type_
    h[157:257] = link[:100].ljust(100, b"\0")
    h[257:265] = magic
    h[329:337] = octal(devmajor, 8)
    h[337:345] = octal(0, 8)
    h[345:500] = prefix.ljust(155, b"\0")
    h[148:156] = b" " * 8
    checksum = sum(h) + (1 if bad_checksum else 0)
    h[148:156] = b"%06o\0 " % checksum
    return bytes(h)


def member(name, data: bytes = b"", **kw) -> bytes:
    return header(name, size=len(data), **kw) + data + bytes(-len(data) % 512)


def pax(records: dict, name: str = "PaxHeader", type_: bytes = b"x") -> bytes:
    body = b""
    for key, value in records.items():
        key = key.encode() if isinstance(key, str) else key
        value = value.encode() if isinstance(value, str) else value
        core = b" " + key + b"=" + value + b"\n"
        n = len(core) + 1
        while len(str(n).encode()) + len(core) != n:
            n += 1
        body += str(n).encode() + core
    return member(name, body, type_=type_)


def gnu_long(kind: bytes, value: str) -> bytes:
    return member("././@LongLink", value.encode() + b"\0", type_=kind, magic=b"ustar  \0")


END = bytes(1024)


def archive(*parts: bytes) -> bytes:
    return b"".join(parts) + END


def tarfile_archive(*infos: tuple[tarfile.TarInfo, bytes], fmt=tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        for info, data in infos:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def info(name: str, type_=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mtime = type_, link, 1_700_000_000
    return ti


# --- the place where a restore happens ------------------------------------------------------------
@pytest.fixture
def site(tmp_path):
    """A customer root with a live service folder; restore stages beside it."""
    parent = tmp_path / "customer"
    live = parent / "svc"
    (live / "sub").mkdir(parents=True)
    (live / "index.js").write_text("live code\n")
    (live / "sub" / "data.json").write_text("{}\n")
    (live / "link").symlink_to("index.js")
    (parent / "x").write_text("a file a member might try to overwrite\n")
    return parent


def state(top: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            entry = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_nlink)
            if stat.S_ISREG(st.st_mode):
                entry += (hashlib.sha256(path.read_bytes()).hexdigest(),)
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(path),)
            out[str(path.relative_to(top))] = entry
    return out


def store_archive(tmp_path: Path, data: bytes, name: str = "b/svc.tar.enc", compression: str = "none"):
    """Through the real path: a file → cat [→ zstd] → encryption → LocalStore."""
    raw = tmp_path / "crafted.tar"
    raw.write_bytes(data)
    keyring = KeyRing(KEY)
    stages = [Stage(["cat"]), sources.compressor_stage(compression)]
    store = LocalStore(tmp_path / "store")
    res = write_artifact(ProcessChain([s for s in stages if s], stdin_path=str(raw)), store, name, keyring=keyring)
    return store, name, dict(sha256=res.sha256, size=res.size, encrypted=True, keyring=keyring,
                             compression=compression)


def assert_refused(tmp_path, site, data: bytes, member_name: str, rule: str, *, limits: Limits | None = None,
                   compression: str = "none") -> ArchiveRefused:
    store, name, cat = store_archive(tmp_path, data, compression=compression)
    before_site, before_top = state(site), sorted(os.listdir(tmp_path))
    before_children = set(children())  # session fixtures (SeaweedFS, sshd) are children too, and stay
    kw = {"limits": limits} if limits else {}
    with pytest.raises(ArchiveRefused) as verified:
        verify_artifact(store, name, tar=True, **cat, **kw)
    dest = site / "svc.restoring"
    with pytest.raises(ArchiveRefused) as extracted:
        extract_artifact(store, name, dest=dest, **cat, **kw)
    for err in (verified.value, extracted.value):
        assert repr(member_name) in str(err), str(err)
        assert rule in err.rule, err.rule
        assert err.member == member_name
    assert not dest.exists()
    assert state(site) == before_site
    assert sorted(os.listdir(tmp_path)) == before_top
    assert f"the staging folder {dest} was removed and nothing else was touched" in str(extracted.value)
    assert [p for p in children() if p not in before_children] == [], "tar or a decompressor outlived the refusal"
    return extracted.value


# --- names ----------------------------------------------------------------------------------------
def test_an_absolute_path_is_refused(tmp_path, site):
    target = str(tmp_path / "planted")
    assert_refused(tmp_path, site, archive(member(target, b"owned\n")), target, "absolute")


@pytest.mark.parametrize("name", ["../x", "a/../../x", "a/b/../../../x", "ok/..", "//x", "C:/x"])
def test_names_that_climb_out_or_look_absolute_are_refused(tmp_path, site, name):
    rule = {"//x": "absolute", "C:/x": "Windows drive"}.get(name, "'..' component")
    assert_refused(tmp_path, site, archive(member("fine.txt", b"ok"), member(name, b"owned\n")), name, rule)


def test_a_pax_path_that_climbs_out_is_refused(tmp_path, site):
    data = archive(pax({"path": "../x"}), member("innocent.txt", b"owned\n"))
    assert_refused(tmp_path, site, data, "../x", "'..' component")


def test_a_gnu_long_name_that_climbs_out_is_refused(tmp_path, site):
    name = "d" * 120 + "/../../../x"
    data = archive(gnu_long(b"L", name), member(name[:100], b"owned\n", magic=b"ustar  \0"))
    assert_refused(tmp_path, site, data, name, "'..' component")


def test_a_long_name_made_by_tarfile_gnu_format_that_climbs_out_is_refused(tmp_path, site):
    name = "e" * 150 + "/../../x"
    data = tarfile_archive((info(name), b"owned\n"), fmt=tarfile.GNU_FORMAT)
    assert_refused(tmp_path, site, data, name, "'..' component")


# --- symlinks -------------------------------------------------------------------------------------
def test_a_symlink_to_an_absolute_target_is_refused(tmp_path, site):
    data = archive(member("svc/", type_=b"5"), member("svc/etc", type_=b"2", link="/etc"))
    assert_refused(tmp_path, site, data, "svc/etc", "is absolute")


def test_a_symlink_that_climbs_out_is_refused(tmp_path, site):
    data = archive(member("svc/", type_=b"5"), member("svc/out", type_=b"2", link="../../outside"))
    assert_refused(tmp_path, site, data, "svc/out", "points outside")


def test_a_symlink_to_dot_cannot_be_climbed_through(tmp_path, site):
    data = archive(member("link", type_=b"2", link="."), member("link/../../x", b"owned\n"))
    assert_refused(tmp_path, site, data, "link/../../x", "'..' component")


def test_a_symlink_target_cannot_climb_through_another_symlink(tmp_path, site):
    # Lexically 'up/../x' stays inside; on disk 'up' is the root, so '..' would leave it.
    data = archive(member("up", type_=b"2", link="."), member("esc", type_=b"2", link="up/../x"))
    assert_refused(tmp_path, site, data, "esc", "which is a symbolic link of this archive, not a directory")


@pytest.mark.parametrize("order", ["link first", "folder first"])
def test_a_symlink_may_climb_back_out_of_a_real_folder_archived_before_or_after_it(tmp_path, site, order):
    """`sub/../x` stays inside when sub is a real folder; tar archives a folder's entries in directory order, so
    the link may come first: sub is then promised to be a folder."""
    link, folder = member("svc/l", type_=b"2", link="sub/../x"), member("svc/sub/", type_=b"5")
    parts = [link, folder] if order == "link first" else [folder, link]
    data = archive(member("svc/", type_=b"5"), *parts, member("svc/x", b"data\n"))
    store, name, cat = store_archive(tmp_path, data)
    extract_artifact(store, name, dest=site / "svc.restoring", **cat)
    assert (site / "svc.restoring" / "svc" / "l").read_text() == "data\n"


@pytest.mark.parametrize(("later", "kind"), [
    (member("up", type_=b"2", link="."), "symbolic link"),  # up/../x would leave the root
    (member("d/e", type_=b"2", link="../.."), "symbolic link"),  # a deeper promised folder
    (member("up", b"file"), "regular file"),
    (member("f", b"x") + member("up", type_=b"1", link="f"), "hard link"),
])
def test_a_folder_a_symlink_climbed_out_of_cannot_arrive_later_as_anything_else(tmp_path, site, later, kind):
    data = archive(member("esc", type_=b"2", link="up/../x"), member("esc2", type_=b"2", link="d/e/../../y"), later)
    name = "d/e" if b"d/e" in later[:100] else "up"
    assert_refused(tmp_path, site, data, name, "may only be a directory")


def test_a_file_written_through_an_earlier_symlink_is_refused(tmp_path, site):
    data = archive(member("svc/", type_=b"5"), member("svc/s", type_=b"2", link="."),
                   member("svc/s/index.js", b"owned\n"))
    assert_refused(tmp_path, site, data, "svc/s/index.js", "written through the symbolic link")


def test_a_directory_turned_into_a_symlink_is_refused(tmp_path, site):
    data = archive(member("d/", type_=b"5"), member("d/f", b"1"), member("d", type_=b"2", link="."))
    assert_refused(tmp_path, site, data, "d", "replace the earlier directory")


# --- hard links -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("target", "rule"), [("/etc/passwd", "absolute"), ("../x", "'..' component"),
                                              ("never-seen", "appears earlier"), ("dir", "appears earlier")])
def test_hard_links_to_anything_but_an_earlier_file_are_refused(tmp_path, site, target, rule):
    data = archive(member("dir/", type_=b"5"), member("dir/f", b"1"), member("h", type_=b"1", link=target))
    assert_refused(tmp_path, site, data, "h", rule)


def test_a_hard_link_to_an_earlier_symlink_extracts_as_a_hard_linked_symlink(tmp_path, site):
    """What `cp -al` of a tree holding a symlink makes, as GNU tar writes it: the second name is a hard-link member."""
    data = archive(member("d/", type_=b"5"), member("d/f", b"data\n"), member("d/s", type_=b"2", link="f"),
                   member("d/h", type_=b"1", link="d/s"), member("d/h2", type_=b"1", link="d/h"))
    store, name, cat = store_archive(tmp_path, data)
    listing = verify_artifact(store, name, tar=True, **cat)
    assert (listing.symlinks, listing.hardlinks, listing.files) == (3, 0, 1)
    dest = site / "svc.restoring"
    extract_artifact(store, name, dest=dest, **cat)
    s, h = os.lstat(dest / "d" / "s"), os.lstat(dest / "d" / "h2")
    assert stat.S_ISLNK(h.st_mode) and (s.st_ino, s.st_nlink) == (h.st_ino, 3)
    assert os.readlink(dest / "d" / "h") == "f"


@pytest.mark.parametrize(("parts", "member_name", "rule"), [
    # the symlink itself leaves the folder: refused as a symlink, before any hard link to it
    ([member("s", type_=b"2", link="../../etc"), member("h", type_=b"1", link="s")], "s", "points outside"),
    # inside from d/e/, outside from the top: the same target text read from the hard link's own folder
    ([member("d/e/s", type_=b"2", link="../../f"), member("h", type_=b"1", link="d/e/s")], "h", "points outside"),
    ([member("h", type_=b"1", link="s"), member("s", type_=b"2", link="f")], "h", "appears earlier"),  # named first
    ([member("d/", type_=b"5"), member("h", type_=b"1", link="d")], "h", "appears earlier"),  # a directory
    ([member("f", b"x"), member("h", type_=b"1", link="h")], "h", "to itself"),
    ([member("s", type_=b"2", link="f"), member("s/x", b"x")], "s/x", "through the symbolic link"),
    ([member("s", type_=b"2", link="d"), member("h", type_=b"1", link="s"), member("h/x", b"x")], "h/x",
     "through the symbolic link"),  # a hard-linked symlink is a symlink: nothing is written through it either
])
def test_hard_links_to_symlinks_are_refused_where_unsafe(tmp_path, site, parts, member_name, rule):
    assert_refused(tmp_path, site, archive(*parts), member_name, rule)


# --- types ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("type_", "rule"), [(b"3", "character device"), (b"4", "block device"), (b"6", "FIFO"),
                                             (b"Z", "type flag"), (b"D", "dumpdir"), (b"X", "Solaris")])
def test_devices_fifos_and_unknown_types_are_refused(tmp_path, site, type_, rule):
    data = archive(member("ok", b"fine"), member("dev/thing", type_=type_, devmajor=1))
    assert_refused(tmp_path, site, data, "dev/thing", rule)


def test_devices_made_by_tarfile_are_refused(tmp_path, site):
    data = tarfile_archive((info("null", tarfile.CHRTYPE), b""))
    assert_refused(tmp_path, site, data, "null", "character device")


def test_a_member_that_changes_type_is_refused(tmp_path, site):
    data = archive(member("a", b"file"), member("a/", type_=b"5"))
    assert_refused(tmp_path, site, data, "a/", "replace the earlier regular file")


def test_a_member_that_appears_twice_is_refused(tmp_path, site):
    data = archive(member("a", b"one"), member("a", b"two"))
    assert_refused(tmp_path, site, data, "a", "appears twice")


def test_a_regular_file_with_a_trailing_slash_is_refused(tmp_path, site):
    data = archive(member("looks-like-a-dir/", b"data"))
    assert_refused(tmp_path, site, data, "looks-like-a-dir/", "ends with '/'")


def test_a_directory_with_data_is_refused(tmp_path, site):
    data = archive(member("d/", b"hidden header", type_=b"5"))
    assert_refused(tmp_path, site, data, "d/", "bytes of data")


# --- limits and corrupt headers -------------------------------------------------------------------
def test_more_members_than_the_limit_are_refused(tmp_path, site):
    data = archive(*(member(f"f{i}", b"x") for i in range(5)))
    assert_refused(tmp_path, site, data, "f3", "more than 3 members", limits=Limits(max_members=3))


def test_a_member_larger_than_the_limit_is_refused(tmp_path, site):
    data = archive(member("small", b"x"), member("big", b"y" * 2000))
    assert_refused(tmp_path, site, data, "big", "more than the limit of 1000", limits=Limits(max_member_size=1000))


def test_files_adding_up_past_the_total_limit_are_refused(tmp_path, site):
    data = archive(*(member(f"f{i}", b"z" * 600) for i in range(3)))
    assert_refused(tmp_path, site, data, "f1", "add up to more", limits=Limits(max_total_size=1000))


def test_a_name_longer_than_the_limit_is_refused(tmp_path, site):
    name = "n/" * 60 + "f"
    data = archive(pax({"path": name}), member("short", b"x"))
    assert_refused(tmp_path, site, data, name, "longer than the limit of 100", limits=Limits(max_name=100))


def test_a_pax_header_larger_than_the_limit_is_refused(tmp_path, site):
    data = archive(pax({"comment": "c" * 5000}, name="PaxHeader/big"), member("f", b"x"))
    assert_refused(tmp_path, site, data, "PaxHeader/big", "more than the limit of 4096",
                   limits=Limits(max_pax_header=4096))


def test_a_bad_header_checksum_is_refused(tmp_path, site):
    data = archive(member("ok", b"fine"), member("tampered", b"data", bad_checksum=True))
    assert_refused(tmp_path, site, data, "tampered", "bad header checksum at byte offset 1024")


@pytest.mark.parametrize("field", [b"0000000001x\0", b" " * 12, b"-0000000001\0", b"\xff" * 12])
def test_a_size_field_that_is_not_a_number_is_refused(tmp_path, site, field):
    data = archive(member("ok", b"fine"), header("weird", size_field=field) + bytes(512))
    assert_refused(tmp_path, site, data, "weird", "is not a valid number")


def test_a_pax_size_that_is_not_a_number_is_refused(tmp_path, site):
    data = archive(pax({"size": "12abc"}), member("f", b"x"))
    assert_refused(tmp_path, site, data, "f", "pax size")


# --- ambiguity: where GNU tar could read the archive differently, we refuse ---------------------------
def test_two_names_for_one_member_are_refused(tmp_path, site):
    data = archive(gnu_long(b"L", "long-" + "l" * 100), pax({"path": "other"}), member("short", b"x"))
    assert_refused(tmp_path, site, data, "long-" + "l" * 100, "two different names")


def test_a_malformed_pax_record_is_refused(tmp_path, site):
    # GNU tar stops at a malformed record and extracts the member anyway, under its header name.
    body = b"19 path=looks-fine\n" + b"9 xx\n"
    data = archive(member("PaxHeader/m", body, type_=b"x"), member("m", b"x"))
    assert_refused(tmp_path, site, data, "PaxHeader/m", "malformed pax header record")


def test_a_global_pax_header_that_renames_members_is_refused(tmp_path, site):
    data = archive(pax({"path": "../x"}, name="GlobalHead", type_=b"g"), member("f", b"x"))
    assert_refused(tmp_path, site, data, "GlobalHead", "global pax header")


def test_a_realsize_without_a_sparse_format_is_refused(tmp_path, site):
    # GNU tar would write 5000 bytes from the stream into 'f', swallowing the next header.
    data = archive(pax({"GNU.sparse.realsize": "5000"}), member("f", b"x"))
    assert_refused(tmp_path, site, data, "f", "sparse")


def test_an_old_gnu_sparse_header_in_a_ustar_archive_is_refused(tmp_path, site):
    data = archive(member("s", b"x", type_=b"S"))
    assert_refused(tmp_path, site, data, "s", "GNU-format header")


def test_a_sparse_map_that_does_not_cover_the_data_is_refused(tmp_path, site):
    src = tmp_path / "sp"
    src.mkdir()
    with open(src / "holes", "wb") as f:
        f.seek(1 << 20)
        f.write(b"q" * 3000)
        f.truncate(2 << 20)
    good = subprocess.run(["tar", "--create", "--file=-", "--directory", str(src), "--format=posix", "--sparse",
                           "holes"], capture_output=True, check=True).stdout
    m = re.search(rb"\n1048576\n([0-9]+)\n", good)  # the map: count, then offset and size of each region
    digits = m.group(1)
    assert int(digits) > BLOCK_SIZE
    bad = good[: m.start(1)] + b"1".rjust(len(digits), b"0") + good[m.end(1) :]  # now claims one block of data
    assert_refused(tmp_path, site, bad, "holes", "sparse map does not match")


# --- a refusal late in a real stream ---------------------------------------------------------------------
def test_a_hostile_member_after_many_good_ones_kills_tar_and_removes_everything(tmp_path, site):
    good = [member(f"svc/file{i}", os.urandom(40_000)) for i in range(60)]  # ~2.4 MB before the bad one
    data = archive(member("svc/", type_=b"5"), *good, member("svc/escape", type_=b"2", link="../../../etc"))
    err = assert_refused(tmp_path, site, data, "svc/escape", "points outside", compression="zstd")
    assert "svc.tar.enc" in str(err)


def test_the_scanner_forwards_nothing_of_a_refused_member():
    data = archive(member("ok", b"A" * 700), member("evil", type_=b"3"))
    scanner = TarScanner("t")
    forwarded = []
    with pytest.raises(ArchiveRefused):
        for i in range(0, len(data), 100):  # small chunks: the header is split across several
            forwarded += [bytes(p) for p in scanner.feed(data[i:i + 100])]
    assert b"".join(forwarded) == data[:512 + 1024][: len(b"".join(forwarded))]
    assert b"evil" not in b"".join(forwarded)


def test_crafted_but_harmless_archives_still_extract(tmp_path, site):
    long = "long-" + "p" * 150
    data = archive(member("./", type_=b"5", mode=0o755), pax({"path": "d/" + long, "mtime": "1.5"}),
                   member("ignored", b"content"), pax({"linkpath": "../d/./" + long}),
                   member("d/rel", type_=b"2", link="truncated"), pax({"linkpath": "./d/" + long}),
                   member("d/h", type_=b"1"), member("d/sub/x", b"deep"))
    store, name, cat = store_archive(tmp_path, data)
    dest = site / "svc.restoring"
    listing = extract_artifact(store, name, dest=dest, **cat)
    assert (listing.files, listing.hardlinks, listing.symlinks, listing.dirs) == (2, 1, 1, 2)
    assert (dest / "d" / "rel").read_bytes() == b"content" == (dest / "d" / "h").read_bytes()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755


def test_an_archive_without_its_end_marker_is_truncated(tmp_path, site):
    store, name, cat = store_archive(tmp_path, member("f", b"x"))
    with pytest.raises(ArtifactError, match="no end-of-archive marker after member 'f': it is truncated"):
        verify_artifact(store, name, tar=True, **cat)


# --- many mutations: whatever the scanner lets through, GNU tar must read the same way ----------------------
def test_mutated_real_archives_are_refused_or_extracted_exactly_never_anything_else(tmp_path):
    rng = random.Random(20251122)
    src = tmp_path / "src"
    deep = src / "svc" / "a" / ("p" * 90) / ("q" * 70)
    deep.mkdir(parents=True)
    (deep / "f.txt").write_text("deep")
    (src / "svc" / "x").write_text("x" * 700)
    (src / "svc" / "l").symlink_to("x")
    os.link(src / "svc" / "x", src / "svc" / "h")
    with open(src / "svc" / "sp", "wb") as f:
        f.seek(100_000)
        f.write(b"s" * 3000)
        f.truncate(300_000)
    bases = [subprocess.run(["tar", "--create", "--file=-", "--directory", str(src), f"--format={fmt}", *extra, "svc"],
                            capture_output=True, check=True).stdout
             for fmt, extra in (("posix", ["--sparse"]), ("gnu", ["--sparse"]), ("ustar", []))]
    values = [b"..", b"/", b"\0", b"../", b"/etc", b".", b"0", b"1", b"2", b"3", b"5", b"L", b"x", b"g", b"S",
              b"00000001000", b"\x80", b" ", b"a/../b", b"//", b"link"]
    fields = [(0, 100), (124, 12), (156, 1), (157, 100), (257, 8), (345, 155), (482, 1), (483, 12), (386, 24)]
    sandbox = tmp_path / "sandbox"
    refused = extracted = 0
    for _ in range(60):
        data = bytearray(rng.choice(bases))
        headers = [m.start() for m in re.finditer(rb"ustar", bytes(data)) if m.start() % 512 == 257]
        for _ in range(rng.randint(1, 3)):
            at = rng.choice(headers) - 257
            start, width = rng.choice(fields)
            value = rng.choice(values)[:width]
            data[at + start : at + start + len(value)] = value
            block = data[at : at + 512]
            block[148:156] = b" " * 8
            data[at + 148 : at + 156] = b"%06o\0 " % sum(block)
        scanner = TarScanner("fuzz")
        try:
            for i in range(0, len(data), 1000):
                scanner.feed(bytes(data[i : i + 1000]))
            scanner.finish()
        except ArtifactError:
            refused += 1
            continue
        shutil.rmtree(sandbox, ignore_errors=True)
        sandbox.mkdir()
        store, name, cat = store_archive(tmp_path, bytes(data), name=f"b/fuzz{extracted}.tar.enc")
        try:
            extract_artifact(store, name, dest=sandbox / "dest", **cat)
        except ArtifactError as exc:  # GNU tar may still reject a value we do not read (a bad mtime)
            assert "tar failed" in str(exc), str(exc)
        assert os.listdir(sandbox) in ([], ["dest"])
        extracted += 1
    assert refused > 10 and extracted > 10


# --- tamed files: no set-id bits, no extended attributes --------------------------------------------------
def test_setid_bits_are_stripped_from_files_and_folders_and_named(tmp_path, site):
    data = archive(member("bin/", type_=b"5", mode=0o2755), member("bin/su", b"#!/bin/sh\n", mode=0o4755),
                   member("bin/both", b"x", mode=0o6750), member("bin/h", type_=b"1", link="bin/su"),
                   member("tmp/", type_=b"5", mode=0o1777), member("plain", b"y", mode=0o640))
    store, name, cat = store_archive(tmp_path, data)
    assert verify_artifact(store, name, tar=True, **cat).setid == [("bin/", 0o2755), ("bin/su", 0o4755),
                                                                   ("bin/both", 0o6750)]
    dest = site / "svc.restoring"
    listing = extract_artifact(store, name, dest=dest, **cat)
    assert listing.setid == [("bin/", 0o2755), ("bin/su", 0o4755), ("bin/both", 0o6750)]
    modes = {p: stat.S_IMODE((dest / p).lstat().st_mode) for p in ("bin", "bin/su", "bin/both", "bin/h", "tmp",
                                                                    "plain")}
    assert modes == {"bin": 0o755, "bin/su": 0o755, "bin/both": 0o750, "bin/h": 0o755, "tmp": 0o1777,
                     "plain": 0o640}  # only the set-id bits go: the sticky bit and the rest stay
    assert (dest / "bin" / "su").read_bytes() == b"#!/bin/sh\n"


def test_a_setid_header_is_rewritten_whole_however_the_stream_is_cut(tmp_path):
    # A GNU sparse file with more regions than its header holds: the rewritten header is followed by
    # extension blocks, so it is held back across chunks before it goes out.
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        for k in range(12):
            f.seek(k * 65536)
            f.write(b"region %d" % k)
    long = "long-" + "n" * 120  # a GNU long-name header before the member's own
    (src / long).write_text("long name")
    for path in src.iterdir():
        os.chmod(path, 0o4755)
    os.chmod(src, 0o2750)
    data = subprocess.run(["tar", "--create", "--file=-", "--format=gnu", "--sparse", "--directory", str(tmp_path),
                           "src"], capture_output=True, check=True).stdout
    whole = b"".join(bytes(p) for p in TarScanner("t").feed(data))
    for size in (1, 100, 511, 512, 513, 4096):
        scanner = TarScanner("t")
        pieces = [bytes(p) for i in range(0, len(data), size) for p in scanner.feed(data[i:i + size])]
        assert b"".join(pieces) == whole, size
        assert sorted(scanner.finish().setid) == [("src/", 0o2750), (f"src/{long}", 0o4755), ("src/sparse", 0o4755)]
    changed = [i for i in range(len(whole) - 512) if data[i] != whole[i]]  # (tar pads its records: cut after the end)
    assert changed and all(i % 512 in range(100, 108) or i % 512 in range(148, 156) for i in changed)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "--extract", "--file=-", "--preserve-permissions", "--directory", str(out)], input=whole,
                   check=True)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out / "src", *(out / "src").iterdir()]} == {
        "src": 0o750, "sparse": 0o755, long: 0o755}
    assert (out / "src" / "sparse").read_bytes() == (src / "sparse").read_bytes()


def test_a_mode_field_that_is_not_a_number_is_refused(tmp_path, site):
    bad = bytearray(member("f", b"x"))
    bad[100:108] = b"rwxr-x\0\0"
    bad[148:156] = b" " * 8
    bad[148:156] = b"%06o\0 " % sum(bad[:512])
    assert_refused(tmp_path, site, archive(bytes(bad)), "f", "mode field")


def test_extended_attributes_are_never_extracted(tmp_path, site):
    # A file capability is a setuid bit by other means; GNU tar would restore it with --xattrs.
    data = archive(pax({"SCHILY.xattr.user.kasa": "planted"}), member("f", b"x", mode=0o755))
    store, name, cat = store_archive(tmp_path, data)
    dest = site / "svc.restoring"
    extract_artifact(store, name, dest=dest, **cat)
    assert os.listxattr(dest / "f") == []
