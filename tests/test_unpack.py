"""Verifying and extracting backup artifacts (engines/unpack.py): real GNU tar, zstd, gzip, encryption, LocalStore.

Artifacts are made the way backups make them (tar_stage → compressor_stage → write_artifact), then read
back; every failure must leave no staging folder, no child process and no thread behind.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest

from engines import runas, sources, trees
from engines.artifact import write_artifact
from engines.backupcrypto import HEADER_SIZE, KeyRing
from engines.stores.local import LocalStore
from engines.streams import ProcessChain, Stage
from engines.unpack import (
    ArchiveRefused,
    ArtifactError,
    Limits,
    Listing,
    check_tree,
    extract_artifact,
    open_plain,
    verify_artifact,
)
from tests.conftest import NOBODY, as_unprivileged, processes

pytestmark = pytest.mark.smoke

KEY = "kid1:" + "a" * 40
OTHER_KEY = "kid2:" + "b" * 40
MTIME = 1_700_000_000
LONG_DIR = "dossier-" + "é" * 60 + "-" + "x" * 60  # 189 bytes: names past 100 and, nested, past 255
SUFFIXES = {"zstd": ".zst", "gzip": ".gz", "none": ""}


# --- helpers ------------------------------------------------------------------------------
def make_tree(root: Path) -> Path:
    """A service folder with every kind of entry a backup must bring back exactly."""
    svc = root / "svc"
    (svc / "src" / "lib" / "deep").mkdir(parents=True)
    (svc / "empty").mkdir()
    (svc / "private").mkdir()
    (svc / LONG_DIR / LONG_DIR).mkdir(parents=True)
    (svc / "src" / "app.js").write_text("console.log('hi')\n" * 200)
    (svc / "src" / "lib" / "deep" / "util.js").write_bytes(os.urandom(3000))
    (svc / ".env").write_text("SECRET=1\n")
    (svc / "run.sh").write_text("#!/bin/sh\necho run\n")
    (svc / LONG_DIR / LONG_DIR / "ünïcödé-ファイル.txt").write_text("long and unicode\n")
    (svc / "src" / "current").symlink_to("lib/deep")
    (svc / "src" / "lib" / "deep" / "up").symlink_to("../../app.js")
    (svc / "dangling").symlink_to("src/not-yet")
    os.link(svc / "src" / "app.js", svc / "app-hardlink.js")
    with open(svc / "sparse.bin", "wb") as f:  # 8 MiB apparent, a few KiB of data
        f.seek(3 << 20)
        f.write(b"middle" * 100)
        f.truncate(8 << 20)
    os.chmod(svc / ".env", 0o600)
    os.chmod(svc / "run.sh", 0o755)
    os.chmod(svc / "private", 0o700)
    os.chmod(svc / "empty", 0o750)
    for path in sorted(svc.rglob("*"), key=lambda p: -len(p.parts)):  # children before parents
        os.utime(path, (MTIME, MTIME + 7 * len(path.name)), follow_symlinks=False)
    os.utime(svc, (MTIME, MTIME))
    return svc


def snapshot(top: Path, *, skip: Path | None = None) -> dict:
    """Everything observable about a tree: type, mode, mtime (s), size, content hash, link target, inode group."""
    out, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(top):
        if skip is not None and Path(dirpath) == skip.parent and skip.name in dirnames:
            dirnames.remove(skip.name)
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(top))
            entry = {"type": stat.S_IFMT(st.st_mode), "mtime": int(st.st_mtime)}
            if not stat.S_ISLNK(st.st_mode):
                entry["mode"] = stat.S_IMODE(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                entry["size"] = st.st_size
                entry["sha"] = hashlib.sha256(path.read_bytes()).hexdigest()
                entry["link_group"] = inodes.setdefault(st.st_ino, rel)
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            out[rel] = entry
    return out


def tar_artifact(store, root: Path, name: str, *, compression: str, keyring=None, members=("svc",)):
    stages = [sources.tar_stage(str(root), list(members)), sources.compressor_stage(compression)]
    res = write_artifact(ProcessChain([s for s in stages if s]), store, name, keyring=keyring)
    return dict(sha256=res.sha256, size=res.size, encrypted=keyring is not None, keyring=keyring,
                compression=compression)


def children() -> list[int]:
    """Live child processes of this test process (zombies count: they were not reaped)."""
    return [pid for pid, (_, ppid, _) in processes().items() if ppid == os.getpid()]


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture
def keyring():
    return KeyRing(KEY)


@pytest.fixture
def clean_process():
    """Fails the test if it leaves a child process or a thread behind."""
    threads = {t.ident for t in threading.enumerate()}
    before = set(children())  # session fixtures (SeaweedFS, sshd) are children too, and stay
    yield
    assert [p for p in children() if p not in before] == []
    left = [t.name for t in threading.enumerate() if t.ident not in threads and t.is_alive()]
    assert left == []


# --- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_extract_brings_back_the_exact_tree(tmp_path, store, keyring, compression, encrypted, clean_process):
    svc = make_tree(tmp_path / "src")
    name = f"b1/svc.tar{SUFFIXES[compression]}{'.enc' if encrypted else ''}"
    cat = tar_artifact(store, tmp_path / "src", name, compression=compression, keyring=keyring if encrypted else None)
    seen = []
    listing = verify_artifact(store, name, tar=True, on_progress=seen.append, **cat)
    assert seen and seen[-1] == cat["size"] and seen == sorted(seen)
    assert listing.files == 6 and listing.hardlinks == 1 and listing.symlinks == 3
    assert listing.dirs == 8 and listing.members == 18 and listing.paths is None
    assert listing.total_size == sum(p.stat().st_size for p in svc.rglob("*") if p.is_file() and not p.is_symlink()
                                     and p.name != "app-hardlink.js")

    dest = tmp_path / "staging"
    got = extract_artifact(store, name, dest=dest, **cat)
    assert got == listing
    assert snapshot(dest / "svc") == snapshot(svc)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    sparse = dest / "svc" / "sparse.bin"
    assert sparse.stat().st_blocks * 512 < 1 << 20, "the sparse file came back dense"


def test_extract_into_an_existing_empty_folder(tmp_path, store, clean_process):
    make_tree(tmp_path / "src")
    cat = tar_artifact(store, tmp_path / "src", "b/svc.tar.zst", compression="zstd")
    dest = tmp_path / "staging"
    dest.mkdir()
    extract_artifact(store, "b/svc.tar.zst", dest=dest, **cat)
    assert (dest / "svc" / "src" / "app.js").is_file()


def test_extract_refuses_a_folder_that_is_not_empty_and_leaves_it(tmp_path, store):
    make_tree(tmp_path / "src")
    cat = tar_artifact(store, tmp_path / "src", "b/svc.tar.zst", compression="zstd")
    dest = tmp_path / "staging"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="is not empty; it was left as it is"):
        extract_artifact(store, "b/svc.tar.zst", dest=dest, **cat)
    assert (dest / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("fmt", ["gnu", "ustar", "posix"])
def test_gnu_tar_formats_with_long_names_and_sparse_files_are_accepted(tmp_path, store, fmt, clean_process):
    src = tmp_path / "src" / "svc"
    deep = src / "a" / ("p" * 90) / ("q" * 60)  # 150+ bytes: ustar uses its prefix field, gnu an L header
    deep.mkdir(parents=True)
    (deep / "file.txt").write_text("deep\n")
    (deep / "link").symlink_to("file.txt")
    if fmt != "ustar":  # ustar has no sparse files nor names past 255 bytes
        with open(src / "holes", "wb") as f:
            f.seek(1 << 20)
            f.write(b"x" * 5000)
            f.truncate(3 << 20)
    stage = Stage(["tar", "--create", "--file=-", "--directory", str(tmp_path / "src"), f"--format={fmt}",
                   *(["--sparse"] if fmt != "ustar" else []), "svc"])
    res = write_artifact(ProcessChain([stage]), store, f"b/{fmt}.tar")
    cat = dict(sha256=res.sha256, size=res.size, encrypted=False, keyring=None, compression="none")
    dest = tmp_path / "staging"
    extract_artifact(store, f"b/{fmt}.tar", dest=dest, **cat)
    assert snapshot(dest / "svc") == snapshot(src)


def test_plaintext_of_a_database_dump_streams_unchanged(tmp_path, store, keyring, clean_process):
    dump = tmp_path / "dump.sql"
    dump.write_bytes(os.urandom(3 << 20))
    res = write_artifact(ProcessChain([Stage(["zstd", "-3", "-q", "-c"])], stdin_path=str(dump)), store,
                         "b/db.sql.zst.enc", keyring=keyring)
    cat = dict(sha256=res.sha256, size=res.size, encrypted=True, keyring=keyring, compression="zstd")
    assert verify_artifact(store, "b/db.sql.zst.enc", tar=False, **cat) is None
    with open_plain(store, "b/db.sql.zst.enc", **cat) as chunks:
        got = hashlib.sha256()
        for chunk in chunks:
            assert len(chunk) <= 1 << 20
            got.update(chunk)
    assert got.hexdigest() == hashlib.sha256(dump.read_bytes()).hexdigest()


# --- broken artifacts ----------------------------------------------------------------------------
def corrupt(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def assert_fails_cleanly(tmp_path, store, name, cat, match) -> str:
    with pytest.raises(ArtifactError, match=match) as err:
        verify_artifact(store, name, tar=True, **cat)
    dest = tmp_path / "staging"
    with pytest.raises(ArtifactError, match=match) as err2:
        extract_artifact(store, name, dest=dest, **cat)
    assert not dest.exists()
    assert f"the staging folder {dest} was removed" in str(err2.value)
    assert name in str(err.value) and KEY not in str(err.value)
    return str(err.value)


@pytest.fixture
def artifact(tmp_path, store, keyring):
    """A 4 MiB-ish encrypted zstd artifact, big enough to span several chunks."""
    src = tmp_path / "src" / "svc"
    src.mkdir(parents=True)
    for i in range(4):
        (src / f"blob{i}").write_bytes(os.urandom(1 << 20))
    name = "b/svc.tar.zst.enc"
    return name, tar_artifact(store, tmp_path / "src", name, compression="zstd", keyring=keyring)


@pytest.mark.parametrize("where", ["header", "middle", "last byte"])
def test_a_corrupt_byte_is_an_artifact_error(tmp_path, store, artifact, where, clean_process):
    name, cat = artifact
    path = store.root / name
    corrupt(path, {"header": 25, "middle": cat["size"] // 2, "last byte": cat["size"] - 1}[where])
    cat = {**cat, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}  # even with a matching catalogue
    assert_fails_cleanly(tmp_path, store, name, cat, r"tampered|corrupt|altered|truncated")


def test_a_corrupt_byte_in_an_unencrypted_artifact_fails_on_the_catalogue(tmp_path, store, clean_process):
    make_tree(tmp_path / "src")
    cat = tar_artifact(store, tmp_path / "src", "b/svc.tar.zst", compression="zstd")
    corrupt(store.root / "b/svc.tar.zst", cat["size"] // 2)
    msg = assert_fails_cleanly(tmp_path, store, "b/svc.tar.zst", cat, "do not match the catalogue")
    assert "the artifact is corrupt or was replaced" in msg


def test_a_truncated_object_is_an_artifact_error(tmp_path, store, artifact, clean_process):
    name, cat = artifact
    path = store.root / name
    path.write_bytes(path.read_bytes()[: cat["size"] // 2])
    assert_fails_cleanly(tmp_path, store, name, cat, r"do not match the catalogue \(size")


def test_a_truncated_object_with_a_matching_catalogue_is_still_refused(tmp_path, store, artifact, clean_process):
    name, cat = artifact
    path = store.root / name
    data = path.read_bytes()[: cat["size"] - 100]
    path.write_bytes(data)
    cat = {**cat, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert_fails_cleanly(tmp_path, store, name, cat, "truncated")


def test_a_wrong_key_names_the_key_id_it_needs(tmp_path, store, artifact, keyring, clean_process):
    name, cat = artifact
    msg = assert_fails_cleanly(tmp_path, store, name, {**cat, "keyring": KeyRing(OTHER_KEY)},
                               "not in KASA_BACKUP_KEYS")
    assert keyring.current_id in msg


def test_an_unknown_key_id_in_the_header_is_an_artifact_error(tmp_path, store, artifact, clean_process):
    name, cat = artifact
    path = store.root / name
    data = bytearray(path.read_bytes())
    data[9:17] = bytes.fromhex(KeyRing(OTHER_KEY).current_id)  # the key id field, after magic and version
    path.write_bytes(bytes(data))
    cat = {**cat, "sha256": hashlib.sha256(data).hexdigest()}
    assert_fails_cleanly(tmp_path, store, name, cat, KeyRing(OTHER_KEY).current_id)


def test_an_altered_wrapped_key_does_not_authenticate(tmp_path, store, artifact, clean_process):
    name, cat = artifact
    corrupt(store.root / name, HEADER_SIZE - 3)
    assert_fails_cleanly(tmp_path, store, name, cat, "header does not authenticate|do not match the catalogue")


def test_a_missing_object_says_where_it_was_looked_for(tmp_path, store, artifact, clean_process):
    name, cat = artifact
    (store.root / name).unlink()
    msg = assert_fails_cleanly(tmp_path, store, name, cat, "is missing from")
    assert str(store.root / "b") in msg


def test_a_catalogue_sha256_that_differs_is_an_artifact_error(tmp_path, store, artifact, clean_process):
    name, cat = artifact
    msg = assert_fails_cleanly(tmp_path, store, name, {**cat, "sha256": "0" * 64}, r"do not match the catalogue "
                               r"\(sha256 [0-9a-f]{64}, the catalogue records 0{64}\)")
    assert "corrupt or was replaced" in msg


def test_a_catalogue_size_that_differs_is_an_artifact_error(tmp_path, store, artifact, clean_process):
    name, cat = artifact
    assert_fails_cleanly(tmp_path, store, name, {**cat, "size": cat["size"] - 1}, "do not match the catalogue")


def test_an_encrypted_object_the_catalogue_calls_plain_is_named_as_such(tmp_path, store, artifact, clean_process):
    name, cat = artifact
    assert_fails_cleanly(tmp_path, store, name, {**cat, "encrypted": False}, "encrypted but the catalogue")


def test_the_wrong_compression_is_a_decompression_error(tmp_path, store, artifact, clean_process):
    name, cat = artifact
    assert_fails_cleanly(tmp_path, store, name, {**cat, "compression": "gzip"}, "could not decompress it")


def test_leaving_the_block_early_stops_the_reader_and_the_decompressor(tmp_path, store, artifact, clean_process):
    name, cat = artifact
    with pytest.raises(RuntimeError, match="consumer gave up"):
        with open_plain(store, name, **cat) as chunks:
            next(chunks)
            raise RuntimeError("consumer gave up")


def test_a_block_that_stops_reading_still_gets_every_check(tmp_path, store, artifact, clean_process):
    name, cat = artifact
    with pytest.raises(ArtifactError, match="do not match the catalogue"):
        with open_plain(store, name, **{**cat, "sha256": "f" * 64}) as chunks:
            next(chunks)


# --- the tree check ---------------------------------------------------------------------------------
def test_check_tree_refuses_special_files_links_out_and_outside_hard_links(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "f").write_text("x")
    listing = Listing(members=1, files=1, total_size=1)
    check_tree(dest, listing)
    os.mkfifo(dest / "pipe")
    with pytest.raises(ArchiveRefused, match="'pipe' is a device, FIFO or socket"):
        check_tree(dest, listing)
    (dest / "pipe").unlink()
    (dest / "out").symlink_to("../elsewhere")
    with pytest.raises(ArchiveRefused, match="'out' resolves outside"):
        check_tree(dest, listing)
    (dest / "out").unlink()
    outside = tmp_path / "outside"
    outside.write_text("y")
    os.link(outside, dest / "g")
    with pytest.raises(ArchiveRefused, match="linked to a file outside"):
        check_tree(dest, Listing(members=2, files=2, total_size=2))


def test_check_tree_notices_when_tar_read_the_archive_differently(tmp_path):
    dest = tmp_path / "dest"
    (dest / "a").mkdir(parents=True)
    (dest / "a" / "f").write_text("x")
    with pytest.raises(ArtifactError, match="does not match the checked listing"):
        check_tree(dest, Listing(members=2, files=1, dirs=1, total_size=2))
    with pytest.raises(ArtifactError, match=r"tar extracted 'a/f' as a regular file but the checked listing does "
                                            "not have it"):
        check_tree(dest, Listing(members=2, files=1, dirs=1, total_size=1, paths={b"a": 1, b"a/g": 2}))
    check_tree(dest, Listing(members=2, files=1, dirs=1, total_size=1, paths={b"a": 1, b"a/f": 2}))


def test_limits_default_to_the_documented_values():
    limits = Limits()
    assert (limits.max_members, limits.max_member_size, limits.max_total_size, limits.max_name,
            limits.max_pax_header) == (1_000_000, 256 << 30, 2 << 40, 4096, 1 << 20)


def test_an_artifact_that_is_not_a_tar_is_refused_by_verify(tmp_path, store, clean_process):
    blob = tmp_path / "blob"
    blob.write_bytes(b"PGDMP" + os.urandom(5000))
    res = write_artifact(ProcessChain([Stage(["cat"])], stdin_path=str(blob)), store, "b/db.dump")
    cat = dict(sha256=res.sha256, size=res.size, encrypted=False, keyring=None, compression="none")
    with pytest.raises(ArtifactError, match="b/db.dump"):
        verify_artifact(store, "b/db.dump", tar=True, **cat)
    assert verify_artifact(store, "b/db.dump", tar=False, **cat) is None


def test_no_tar_options_from_the_environment_reach_tar(tmp_path, store, monkeypatch, clean_process):
    make_tree(tmp_path / "src")
    cat = tar_artifact(store, tmp_path / "src", "b/svc.tar", compression="none")
    monkeypatch.setenv("TAR_OPTIONS", "--to-stdout")  # would write nothing to disk if tar saw it
    extract_artifact(store, "b/svc.tar", dest=tmp_path / "staging", **cat)
    assert (tmp_path / "staging" / "svc" / "run.sh").is_file()


# --- as the unprivileged user the worker is in production ---------------------------------------
def unprivileged_artifact(top: Path, read_only: dict[str, int]):
    """make_tree() with some read-only folders, archived into a store that uid 65534 may read."""
    svc = make_tree(top / "src")
    for rel, mode in read_only.items():
        os.chmod(svc / rel, mode)  # (a mode change leaves the folder's mtime as it was)
    store = LocalStore(top / "store")
    cat = tar_artifact(store, top / "src", "b/svc.tar.zst", compression="zstd")
    for dirpath, _, filenames in os.walk(top / "store"):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    return svc, store, cat


def test_an_unprivileged_worker_extracts_the_exact_tree_owned_by_itself(unprivileged_dir):
    svc, store, cat = unprivileged_artifact(unprivileged_dir, {"src/lib": 0o555, "private": 0o500})
    dest = unprivileged_dir / "staging"

    as_unprivileged(extract_artifact, store, "b/svc.tar.zst", dest=dest, **cat)

    assert snapshot(dest / "svc") == snapshot(svc)  # read-only folders come back read-only
    assert {p.lstat().st_uid for p in dest.rglob("*")} == {NOBODY}  # --no-same-owner: never root's


def test_an_unprivileged_worker_removes_what_it_extracted_read_only_folders_included(unprivileged_dir):
    # What a drill does with each test extraction, and a restore with a staged tree it gives up.
    _, store, cat = unprivileged_artifact(unprivileged_dir, {"src/lib": 0o555, "src": 0o555, "private": 0o500})
    dest = unprivileged_dir / "staging"

    def extract_then_remove():
        extract_artifact(store, "b/svc.tar.zst", dest=dest, **cat)
        assert stat.S_IMODE((dest / "svc" / "src").stat().st_mode) == 0o555
        trees.remove_tree(dest, ignore_errors=True)  # as backups/verify.py does

    as_unprivileged(extract_then_remove)
    assert not dest.exists()


# --- as the customer's user -------------------------------------------------------------------------
def test_extract_as_the_customer_user_brings_back_the_exact_tree_owned_by_it(tmp_path, store, customer_users,
                                                                          clean_process):
    owner = runas.lookup(customer_users[0])
    svc = make_tree(tmp_path / "src")
    os.chown(svc / "run.sh", 0, 0)
    os.chown(svc / "src", runas.lookup(customer_users[1]).uid, 0)  # another user's: never comes back as such
    cat = tar_artifact(store, tmp_path / "src", "b/svc.tar.zst", compression="zstd")
    dest = tmp_path / "staging"

    extract_artifact(store, "b/svc.tar.zst", dest=dest, owner=owner, **cat)

    assert snapshot(dest / "svc") == snapshot(svc)
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in [dest, *dest.rglob("*")]}
    assert owners == {(owner.uid, owner.gid)}


def test_a_staging_folder_that_is_a_link_is_refused_and_left(tmp_path, store, customer_users):
    make_tree(tmp_path / "src")
    cat = tar_artifact(store, tmp_path / "src", "b/svc.tar.zst", compression="zstd")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "staging").symlink_to(elsewhere)
    with pytest.raises(ArtifactError, match="exists and is not a folder; it was left as it is"):
        extract_artifact(store, "b/svc.tar.zst", dest=tmp_path / "staging", owner=runas.lookup(customer_users[0]),
                         **cat)
    assert os.listdir(elsewhere) == [] and elsewhere.stat().st_uid == 0


def test_check_tree_refuses_setid_bits_and_foreign_owners_left_on_disk(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "f").write_text("x")
    listing = Listing(members=1, files=1, total_size=1)
    check_tree(dest, listing, uid=0)
    os.chmod(dest / "f", 0o4755)
    with pytest.raises(ArchiveRefused, match="'f' has a setuid or setgid bit") as refused:
        check_tree(dest, listing, uid=0)
    assert refused.value.rule == "set-id bit"
    os.chmod(dest / "f", 0o755)
    os.chown(dest / "f", NOBODY, NOBODY)
    with pytest.raises(ArchiveRefused, match="'f' belongs to uid 65534, not 0"):
        check_tree(dest, listing, uid=0)


def test_an_unprivileged_worker_cannot_give_files_to_a_customer_user(unprivileged_dir, customer_users):
    _, store, cat = unprivileged_artifact(unprivileged_dir, {})
    owner = runas.lookup(customer_users[0])
    dest = unprivileged_dir / "staging"

    def refused():
        with pytest.raises(ArtifactError, match=r"the worker runs as uid 65534 and cannot give the restored files to "
                                                r"kasa-t-alpha \(uid \d+\)"):
            extract_artifact(store, "b/svc.tar.zst", dest=dest, owner=owner, **cat)

    as_unprivileged(refused)
    assert not dest.exists()
