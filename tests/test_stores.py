"""Storage targets against real backends: a folder, SeaweedFS's S3 server over HTTP, OpenSSH's sshd.

What backups rely on: bytes come back identical, nothing is visible before
commit, an aborted or failed write leaves nothing (no temp file, no incomplete
multipart upload), memory stays bounded while streaming, and failures are
quick, clear and free of credentials.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from engines.secretbox import Secret
from engines.stores import LocalStore, StoreError, StoreNotFound, store_from_config
from tests.conftest import BASE_DIR, free_port
from tests.s3 import ACCESS_KEY, SECRET_KEY, start_seaweed
from tests.sftp import _keypair

MiB = 1 << 20
ODD_CHUNKS = [1, 4093, 65537, 1 * MiB + 3, 777_777, 2 * MiB - 1]


# --- a real sshd -------------------------------------------------------------------
@pytest.fixture
def sftp_root(sshd, tmp_path):
    root = tmp_path / "sftp-root"
    yield root
    shutil.rmtree(root, ignore_errors=True)


def sftp_store(sshd, root, **kw):
    from engines.stores.sftp import SFTPStore

    kw.setdefault("private_key", sshd["private_key"])
    return SFTPStore(sshd["host"], sshd["port"], sshd["username"], path=str(root), **kw)


# --- one store of each kind ---------------------------------------------------------
@pytest.fixture(params=["local", "s3", "sftp"])
def store(request, tmp_path):
    """A store of each kind, with a peek at what the backend really holds (temp files, uploads)."""
    if request.param == "local":
        s = LocalStore(tmp_path / "store")
        s.leftovers = lambda: sorted(str(p.relative_to(s.root)) for p in s.root.rglob("*") if p.is_file())
        yield s
    elif request.param == "s3":
        server = request.getfixturevalue("s3_server")
        s = server.store(part_size=5 * MiB)
        client = server.client()

        def leftovers():
            objects = [o["Key"] for o in client.list_objects_v2(Bucket=server.bucket).get("Contents", [])]
            uploads = [u["Key"] for u in client.list_multipart_uploads(Bucket=server.bucket).get("Uploads", [])]
            return sorted(objects + [f"upload:{k}" for k in uploads])

        s.leftovers, s.s3 = leftovers, (client, server.bucket)
        yield s
    else:
        sshd = request.getfixturevalue("sshd")
        root = request.getfixturevalue("sftp_root")
        s = sftp_store(sshd, root)
        s.leftovers = lambda: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        yield s
        s.close()


def random_stream(total: int, seed: bytes = b"kasa"):
    """Deterministic incompressible bytes in odd-sized chunks, without holding `total` in memory."""
    block = hashlib.shake_256(seed).digest(3 * MiB)
    sent, i = 0, 0
    while sent < total:
        n = min(ODD_CHUNKS[i % len(ODD_CHUNKS)], total - sent)
        start = (sent * 7) % (len(block) - n) if n < len(block) else 0
        yield block[start:start + n]
        sent += n
        i += 1


def read_all(fh, size: int = 999_983) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    while chunk := fh.read(size):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


# --- every kind ---------------------------------------------------------------------
def test_streamed_object_in_odd_chunks_reads_back_identical(store):
    name = "shop.example.com/20261122T051500Z-12/backend.tar.zst.enc"
    total = 12 * MiB + 12345  # three 5 MiB parts on S3: a real multipart upload
    h = hashlib.sha256()
    with store.open_write(name) as w:
        for chunk in random_stream(total):
            h.update(chunk)
            assert w.write(chunk) == len(chunk)
    assert w.state == "committed" and w.size == total
    assert store.exists(name) and store.size(name) == total
    with store.open_read(name) as fh:
        assert read_all(fh) == (h.hexdigest(), total)
    if store.kind == "s3":
        client, bucket = store.s3
        assert "-3" in client.head_object(Bucket=bucket, Key=name)["ETag"], "expected a 3-part multipart upload"
    assert store.leftovers() == [name]


def test_object_written_from_one_reused_buffer_reads_back_identical(store):
    """The backup stream hands writers views of one buffer it overwrites: each writer must copy what it keeps."""
    name = "shop.example.com/20261122T051500Z-13/db-main.pgdump.zst.enc"
    buf = bytearray(2 * MiB)  # random_stream's chunks are at most 2 MiB - 1
    view = memoryview(buf)
    h, total = hashlib.sha256(), 0
    with store.open_write(name) as w:
        for chunk in random_stream(11 * MiB + 5):
            buf[: len(chunk)] = chunk
            w.write(view[: len(chunk)])
            h.update(chunk)
            total += len(chunk)
            buf[: len(chunk)] = b"\0" * len(chunk)  # what a writer kept a reference to is now zeros
    with store.open_read(name) as fh:
        assert read_all(fh) == (h.hexdigest(), total)


def test_exists_size_list_delete_and_delete_prefix(store):
    names = ["a.example.com/1/backup.json", "a.example.com/1/db/main.dump", "a.example.com/10/backup.json",
             "b.example.com/1/backup.json"]
    for i, n in enumerate(names):
        with store.open_write(n) as w:
            w.write(b"x" * (i + 1))
    assert store.size("a.example.com/1/db/main.dump") == 2
    assert not store.exists("a.example.com/1/missing") and not store.exists("a.example.com/1")
    assert store.list("") == sorted(names)
    assert store.list("a.example.com/1") == names[:2]  # a folder, not a string prefix: '1' does not hold '10'
    assert store.list("a.example.com/1/") == names[:2]
    assert store.list("nothing.here") == []
    with pytest.raises(StoreNotFound):
        store.size("a.example.com/1/missing")
    with pytest.raises(StoreNotFound):
        store.open_read("a.example.com/1/missing")

    store.delete("a.example.com/10/backup.json")
    store.delete("a.example.com/10/backup.json")  # missing is fine
    assert not store.exists("a.example.com/10/backup.json")
    assert store.delete_prefix("a.example.com/1") == 2
    assert store.delete_prefix("a.example.com/1") == 0
    assert store.list("") == ["b.example.com/1/backup.json"]
    with pytest.raises(StoreError, match="whole store"):
        store.delete_prefix("")


def test_nothing_is_visible_before_commit_and_abort_leaves_nothing(store):
    name = "c.example.com/2/backend.tar"
    w = store.open_write(name)
    for chunk in random_stream(7 * MiB):  # past one 5 MiB part: S3 has started a multipart upload
        w.write(chunk)
    assert not store.exists(name) and store.list("") == []
    if store.kind == "s3":
        client, bucket = store.s3
        assert len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1
    w.abort()
    w.abort()  # twice is harmless
    assert not store.exists(name)
    assert store.leftovers() == []  # no temp file, no incomplete multipart upload
    with pytest.raises(StoreError, match="after aborted"):
        w.write(b"late")


def test_an_exception_inside_with_aborts_the_write(store):
    name = "d.example.com/3/db.dump"
    with pytest.raises(RuntimeError, match="the dump failed"):
        with store.open_write(name) as w:
            for chunk in random_stream(6 * MiB):
                w.write(chunk)
            raise RuntimeError("the dump failed")
    assert w.state == "aborted"
    assert store.leftovers() == []


def test_commit_replaces_an_existing_object_whole(store):
    name = "e.example.com/4/backup.json"
    with store.open_write(name) as w:
        w.write(b"old" * 1000)
    with store.open_write(name) as w:
        w.write(b"new")
    with store.open_read(name) as fh:
        assert fh.read() == b"new"


@pytest.mark.parametrize("bad", ["../escape", "/etc/passwd", "a//b", "a/./b", "a/../b", "", "a\\b", "a/"])
def test_names_cannot_escape_the_root(store, bad):
    with pytest.raises(StoreError):
        store.open_write(bad)
    with pytest.raises(StoreError):
        store.exists(bad)


def test_check_writes_reads_and_deletes_a_probe(store):
    msg = store.check()
    assert "wrote, read back and deleted a probe object" in msg
    assert store.leftovers() == []


def test_location_names_the_folder_or_url(store, tmp_path):
    loc = store.location("shop.example.com/20261122T051500Z-12")
    if store.kind == "local":
        assert loc == str(tmp_path.resolve() / "store" / "shop.example.com/20261122T051500Z-12")
    elif store.kind == "s3":
        assert loc == f"s3://{store.bucket}/shop.example.com/20261122T051500Z-12"
    else:
        assert loc.startswith(f"sftp://{getpass.getuser()}@127.0.0.1:") and loc.endswith(
            "/sftp-root/shop.example.com/20261122T051500Z-12")
    assert (store.download_url("x/y", 60) is None) == (store.kind != "s3")


# --- local folder -------------------------------------------------------------------
def test_local_files_are_0600_and_folders_0700(tmp_path):
    old = os.umask(0o022)
    try:
        s = LocalStore(tmp_path / "new" / "store")
        with s.open_write("f.example.com/5/backend.tar") as w:
            w.write(b"data")
    finally:
        os.umask(old)
    root = tmp_path / "new" / "store"
    assert stat.S_IMODE((root / "f.example.com/5/backend.tar").stat().st_mode) == 0o600
    for folder in (root, root / "f.example.com", root / "f.example.com/5"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_local_symlink_out_of_the_root_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    s = LocalStore(tmp_path / "store")
    (s.root / "link").symlink_to(outside)
    with pytest.raises(StoreError, match="outside"):
        s.open_write("link/stolen")
    assert list(outside.iterdir()) == []


def _resident_bytes(path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def test_local_artifacts_go_to_disk_without_filling_the_page_cache(tmp_path):
    """O_DIRECT: gigabytes of backup must not push the live instance's files out of memory."""
    s = LocalStore(tmp_path / "store")
    name = "shop.example.com/20261122T051500Z-14/backend.tar.zst.enc"
    h = hashlib.sha256()
    with s.open_write(name) as w:
        for chunk in random_stream(24 * MiB + 999):
            h.update(chunk)
            w.write(chunk)
        assert w._fh.direct, "the writer should use O_DIRECT on this filesystem"
    path = s.root / name
    assert _resident_bytes(path) <= 64 * 1024  # only the last partial block went through the page cache
    with s.open_read(name) as fh:
        assert read_all(fh)[0] == h.hexdigest()


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_local_writer_falls_back_to_the_page_cache_where_o_direct_is_refused(tmp_path, monkeypatch, refused_at):
    """Some filesystems (FUSE, some network mounts) refuse O_DIRECT with EINVAL at open() or at the first
    write. This machine's filesystems accept it, so the refusal is simulated; the object must still be whole."""
    import errno as errno_

    from engines import directio

    real_open, real_write = os.open, os.write
    fds = set()

    def fake_open(path, flags, mode=0o777, **kw):
        if refused_at == "open" and flags & os.O_DIRECT:
            raise OSError(errno_.EINVAL, "Invalid argument")
        fd = real_open(path, flags, mode, **kw)
        if flags & os.O_DIRECT:
            fds.add(fd)
        return fd

    def fake_write(fd, data):
        if fd in fds and directio.fcntl.fcntl(fd, directio.fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno_.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(directio.os, "open", fake_open)
    monkeypatch.setattr(directio.os, "write", fake_write)
    s = LocalStore(tmp_path / "store")
    h, total = hashlib.sha256(), 9 * MiB + 3
    with s.open_write("f.example.com/1/a.tar") as w:
        for chunk in random_stream(total):
            h.update(chunk)
            w.write(chunk)
    assert not w._fh.direct
    monkeypatch.undo()
    with s.open_read("f.example.com/1/a.tar") as fh:
        assert read_all(fh) == (h.hexdigest(), total)


def test_local_disk_full_raises_and_leaves_no_partial_file(tmp_path):
    """A real full filesystem: a 2 MiB tmpfs (needs root and mount rights; the rlimit test covers the rest)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with mount rights)")
    try:
        s = LocalStore(mnt / "store")
        with pytest.raises(StoreError, match=r"^disk full writing g.example.com/6/big.tar in local folder"):
            with s.open_write("g.example.com/6/big.tar") as w:
                for chunk in random_stream(5 * MiB):
                    w.write(chunk)
        assert w.state == "aborted"
        assert [p for p in mnt.rglob("*") if p.is_file()] == []
        assert shutil.disk_usage(mnt).used < 64 * 1024  # the space is given back
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_local_file_size_limit_raises_and_leaves_no_partial_file(tmp_path):
    """RLIMIT_FSIZE in a child process: the same no-room path (EFBIG) without root."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(BASE_DIR)!r})
        from engines.stores import LocalStore, StoreError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        s = LocalStore({str(tmp_path / "store")!r})
        try:
            with s.open_write("h.example.com/7/big.tar") as w:
                for _ in range(3):
                    w.write(b"z" * (1 << 20))
        except StoreError as exc:
            print(exc)
            sys.exit(0)
        sys.exit("no StoreError")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("file size limit reached writing h.example.com/7/big.tar in local folder")
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []


def test_local_check_fails_when_the_folder_is_unusable(tmp_path):
    s = LocalStore(tmp_path / "store")
    s.root.rmdir()
    s.root.write_text("a file where the folder should be")
    with pytest.raises(StoreError, match=f"local folder {s.root}"):
        s.check()


# --- S3 -----------------------------------------------------------------------------
def test_s3_memory_stays_bounded_while_streaming_200_mb(s3_server):
    """Peak RSS of a child that streams 200 MB, and the writer's own count of buffered bytes.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a big
    pytest process would report the parent's size.
    """
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(BASE_DIR)!r})
        from engines.stores.s3 import S3Store
        s = S3Store({s3_server.bucket!r}, endpoint_url={s3_server.endpoint!r}, region="us-east-1",
                    access_key={s3_server.access_key!r}, secret_key={s3_server.secret_key!r},
                    part_size=5 << 20, max_inflight=2)
        def hwm_kb():
            with open("/proc/self/status") as f:
                return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
        block = bytes(range(256)) * 4096  # 1 MiB
        before = hwm_kb()
        with s.open_write("big/stream.bin") as w:
            for _ in range(200):
                w.write(block)
        print(json.dumps({{"before_kb": before, "peak_kb": hwm_kb(), "peak_buffered": w.peak_buffered,
                          "size": w.size}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    print(out)
    assert out["size"] == 200 * MiB
    assert out["peak_buffered"] <= 2 * 5 * MiB  # part_size × max_inflight
    assert out["peak_kb"] < 150 * 1024, out  # the whole process, boto3 included
    assert s3_server.store().size("big/stream.bin") == 200 * MiB


def test_s3_writer_with_one_inflight_part_buffers_one_part(s3_server):
    s = s3_server.store(part_size=5 * MiB, max_inflight=1)
    with s.open_write("one/part.bin") as w:
        for chunk in random_stream(11 * MiB):
            w.write(chunk)
    assert w.peak_buffered <= 5 * MiB
    assert s.size("one/part.bin") == 11 * MiB


def test_s3_presigned_url_downloads_the_object(s3_server):
    s = s3_server.store()
    with s.open_write("dl/backup.json") as w:
        w.write(b'{"format": 1}')
    url = s.download_url("dl/backup.json", expires=300)
    assert url.startswith(s3_server.endpoint) and "X-Amz-Expires=300" in url
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (a local test server)
        assert resp.read() == b'{"format": 1}'


def test_s3_prefix_keeps_objects_under_it(s3_server):
    s = s3_server.store(prefix="kasa/backups")
    with s.open_write("p.example.com/1/backup.json") as w:
        w.write(b"{}")
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_server.bucket)["Contents"]]
    assert keys == ["kasa/backups/p.example.com/1/backup.json"]
    assert s.list("") == ["p.example.com/1/backup.json"]
    assert s.location("p.example.com/1") == f"s3://{s3_server.bucket}/kasa/backups/p.example.com/1"


def test_s3_delete_prefix_aborts_uploads_a_killed_writer_left(s3_server):
    """A worker killed mid-upload never aborts: cleanup of the backup folder must."""
    s = s3_server.store(part_size=5 * MiB)
    w = s.open_write("k.example.com/9/backend.tar")
    for chunk in random_stream(6 * MiB):
        w.write(chunk)
    with s.open_write("k.example.com/9/backup.json") as w2:
        w2.write(b"{}")
    # w is dropped without commit or abort, as by a killed process
    assert s.delete_prefix("k.example.com/9") == 2  # one object + one incomplete upload
    client = s3_server.client()
    assert client.list_multipart_uploads(Bucket=s3_server.bucket).get("Uploads", []) == []
    assert s.list("") == []
    w._pool.shutdown()


def test_s3_down_fails_in_seconds_with_a_clear_message_and_no_credentials():
    from engines.stores.s3 import S3Store

    port = free_port()  # nothing listens there
    s = S3Store("kasa-backups", endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1",
                access_key="AKIAKASATESTKEYID42", secret_key="s3cr3t-value-never-shown")
    started = time.monotonic()
    with pytest.raises(StoreError) as err:
        s.check()
    assert time.monotonic() - started < 15
    msg = str(err.value)
    assert "kasa-backups" in msg and f"127.0.0.1:{port}" in msg and "cannot connect" in msg
    assert "AKIAKASATESTKEYID42" not in msg and "s3cr3t" not in msg


def test_s3_going_down_mid_upload_fails_the_commit_quickly(tmp_path):
    server = start_seaweed(tmp_path / "seaweedfs")  # a private server, stopped mid-upload
    try:
        import boto3

        boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
                     aws_secret_access_key=SECRET_KEY).create_bucket(Bucket="going-down")
        from engines.stores.s3 import S3Store

        s = S3Store("going-down", endpoint_url=server.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                    part_size=5 * MiB)
        w = s.open_write("x.example.com/1/backend.tar")
        for chunk in random_stream(6 * MiB):
            w.write(chunk)
        server.kill()
        started = time.monotonic()
        with pytest.raises(StoreError, match="cannot connect") as err:
            w.commit()
        assert time.monotonic() - started < 30
        assert w.state == "aborted" and SECRET_KEY not in str(err.value)
        assert "going-down" in str(err.value)
        assert SECRET_KEY not in w.abort_error  # the abort could not reach S3 either, and says so cleanly
    finally:
        server.stop()


def test_s3_missing_bucket_is_named_in_the_error(s3_server):
    from engines.stores.s3 import S3Store

    s = S3Store("no-such-bucket-kasa", endpoint_url=s3_server.endpoint, access_key=s3_server.access_key,
                secret_key=s3_server.secret_key)
    with pytest.raises(StoreError, match="bucket no-such-bucket-kasa.*the bucket does not exist|"
                                         "s3://no-such-bucket-kasa/.*the bucket does not exist"):
        s.check()
    with pytest.raises(StoreError, match="the bucket does not exist"):
        s.list("")


# --- SFTP ---------------------------------------------------------------------------
def test_sftp_host_key_pinning(sshd, sftp_root):
    from engines.stores.sftp import fingerprint

    s = sftp_store(sshd, sftp_root, host_key=sshd["host_key"])
    assert "(pinned)" in s.check()
    pinned = s.server_fingerprint
    s.close()
    s = sftp_store(sshd, sftp_root, host_key=pinned)
    assert s.check()
    s.close()
    import paramiko

    other = fingerprint(paramiko.Ed25519Key.from_private_key(__import__("io").StringIO(_keypair()[0])))
    with pytest.raises(StoreError, match="does not match the pinned one"):
        sftp_store(sshd, sftp_root, host_key=other).check()


def test_sftp_check_fails_with_a_wrong_key_or_closed_port(sshd, sftp_root):
    with pytest.raises(StoreError, match="authentication as .* failed") as err:
        sftp_store(sshd, sftp_root, private_key=_keypair()[0]).check()
    assert "PRIVATE KEY" not in str(err.value)
    from engines.stores.sftp import SFTPStore

    s = SFTPStore("127.0.0.1", free_port(), "nobody", password="pw-never-shown", path="/srv")
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot connect") as err:
        s.check()
    assert time.monotonic() - started < 15 and "pw-never-shown" not in str(err.value)


def test_sftp_files_are_0600_and_temp_files_are_removed_on_abort(sshd, sftp_root):
    s = sftp_store(sshd, sftp_root)
    with s.open_write("m.example.com/1/a.tar") as w:
        w.write(b"abc")
    assert stat.S_IMODE((sftp_root / "m.example.com/1/a.tar").stat().st_mode) == 0o600
    assert stat.S_IMODE((sftp_root / "m.example.com").stat().st_mode) == 0o700
    w = s.open_write("m.example.com/1/b.tar")
    w.write(b"partial")
    temps = [p.name for p in (sftp_root / "m.example.com/1").iterdir() if p.name.endswith(".part")]
    assert len(temps) == 1 and s.list("m.example.com") == ["m.example.com/1/a.tar"]
    w.abort()
    assert sorted(p.name for p in (sftp_root / "m.example.com/1").iterdir()) == ["a.tar"]
    s.close()


# --- the factory ----------------------------------------------------------------------
def test_store_from_config_builds_each_kind(tmp_path, s3_server, sshd, sftp_root):
    local = store_from_config("local", {"path": str(tmp_path / "l")}, {})
    assert local.kind == "local" and local.check()
    s3 = store_from_config("s3", {"bucket": s3_server.bucket, "endpoint_url": s3_server.endpoint, "prefix": "",
                                  "region": None}, {"access_key": Secret(s3_server.access_key),
                                                         "secret_key": Secret(s3_server.secret_key)})
    assert s3.kind == "s3" and s3.check()
    sftp = store_from_config("sftp", {"host": sshd["host"], "port": sshd["port"], "username": sshd["username"],
                                      "path": str(sftp_root)}, {"private_key": Secret(sshd["private_key"])})
    assert sftp.kind == "sftp" and "host key SHA256:" in sftp.check()
    sftp.close()
    with pytest.raises(StoreError, match="unknown storage kind 'ftp'"):
        store_from_config("ftp", {}, {})
    with pytest.raises(StoreError, match="path is required"):
        store_from_config("local", {"path": ""}, {})

