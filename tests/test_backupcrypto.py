"""Encrypted backup artifacts (engines.backupcrypto), tested alone: no Django, real crypto, real files."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from engines import backupcrypto as bc

pytestmark = pytest.mark.smoke

OLD_KEY = "old-backup-key-" + "o" * 30
NEW_KEY = "new-backup-key-" + "n" * 30
CHUNK = 16384  # Cobblestone plaintext chunk
CT_CHUNK = CHUNK + 16  # the same chunk encrypted, with its GCM tag
PREFIX = 56  # Cobblestone salt + key commitment, right after our header
BODY = bc.HEADER_SIZE + PREFIX  # offset of the first Cobblestone chunk
REPO = Path(__file__).resolve().parent.parent


def encrypt(data: bytes, keys: str = OLD_KEY, pieces: list[int] | None = None) -> bytes:
    out = io.BytesIO()
    with bc.EncryptingWriter(out, bc.KeyRing(keys)) as writer:
        if pieces is None:
            writer.write(data)
        else:
            pos, i = 0, 0
            while pos < len(data):
                writer.write(data[pos : pos + pieces[i % len(pieces)]])
                pos += pieces[i % len(pieces)]
                i += 1
    return out.getvalue()


def decrypt(blob: bytes, keys: str = OLD_KEY, chunk_size: int = 1 << 20) -> bytes:
    out = io.BytesIO()
    size = bc.decrypt_stream(io.BytesIO(blob), out, bc.KeyRing(keys), chunk_size=chunk_size)
    assert size == len(out.getvalue())
    return out.getvalue()


def flip(blob: bytes, pos: int, mask: int = 0x01) -> bytes:
    return blob[:pos] + bytes([blob[pos] ^ mask]) + blob[pos + 1 :]


def decrypt_file_fails(tmp_path: Path, blob: bytes, keys: str = OLD_KEY) -> str:
    """Decrypt blob through decrypt_file, expect failure, and prove nothing was left behind."""
    src = tmp_path / "artifact.enc"
    src.write_bytes(blob)
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    with pytest.raises(bc.BackupDecryptError) as err:
        bc.decrypt_file(src, out_dir / "restored.tar", bc.KeyRing(keys))
    assert list(out_dir.iterdir()) == [], "a failed decryption left a file behind"
    return str(err.value)


# --- keys --------------------------------------------------------------------------
def test_key_ids_are_stable_distinct_short_hex_and_not_a_hash_of_the_raw_key():
    ring = bc.KeyRing(f"{NEW_KEY},{OLD_KEY}")
    assert ring.ids == [bc.KeyRing(NEW_KEY).current_id, bc.KeyRing(OLD_KEY).current_id]
    assert ring.current_id == ring.ids[0] != ring.ids[1]
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ring.ids)
    raw_hash = hashlib.sha256(OLD_KEY.encode()).hexdigest()
    assert ring.ids[1] not in raw_hash
    assert len(ring.kek(ring.ids[1])) == 32 and ring.kek(ring.ids[0]) != ring.kek(ring.ids[1])
    assert OLD_KEY not in repr(ring) and NEW_KEY not in repr(ring)


def test_unknown_key_id_raises_a_key_error_naming_it():
    with pytest.raises(KeyError) as err:
        bc.KeyRing(OLD_KEY).kek("0123456789abcdef")
    assert str(err.value) == "no key with id 0123456789abcdef in KASA_BACKUP_KEYS"


def test_short_or_missing_backup_keys_are_refused_naming_the_setting():
    for bad in ("", " , ", "too-short"):
        with pytest.raises(bc.BackupKeyError, match="KASA_BACKUP_KEYS"):
            bc.KeyRing(bad)


# --- round trips -------------------------------------------------------------------
@pytest.mark.parametrize(
    "size",
    [0, 1, 100, CHUNK - 1, CHUNK, CHUNK + 1, 1 << 20, (5 << 20) + 12345],
    ids=["empty", "1B", "small", "chunk-1", "exactly-chunk", "chunk+1", "exactly-read-size", "5MiB+odd"],
)
def test_round_trip_of_data_written_in_odd_sized_pieces(size):
    data = os.urandom(size)
    blob = encrypt(data, pieces=[7, 16383, 65537, 1, 300001])
    assert bc.is_encrypted(blob)
    assert decrypt(blob) == data
    assert decrypt(blob, chunk_size=CT_CHUNK) == data  # read boundaries on chunk boundaries
    if size <= 1 << 20:
        assert decrypt(blob, chunk_size=1) == data  # and on every byte


def test_ciphertext_hides_the_plaintext_and_each_artifact_gets_a_fresh_data_key():
    data = b"DATABASE_PASSWORD=hunter2\n" * 1000
    one, two = encrypt(data), encrypt(data)
    assert b"hunter2" not in one
    assert one[bc.HEADER_SIZE - 48 : bc.HEADER_SIZE] != two[bc.HEADER_SIZE - 48 : bc.HEADER_SIZE]
    assert one[BODY:] != two[BODY:]


def test_writer_counts_bytes_and_refuses_writes_after_close():
    out = io.BytesIO()
    writer = bc.EncryptingWriter(out, bc.KeyRing(OLD_KEY))
    writer.write(b"x" * 40000)
    writer.close()
    writer.close()  # idempotent: no second final chunk
    assert (writer.bytes_in, writer.bytes_out) == (40000, len(out.getvalue()))
    assert writer.closed
    with pytest.raises(ValueError):
        writer.write(b"more")
    assert decrypt(out.getvalue()) == b"x" * 40000


def test_decrypt_file_writes_a_private_file_and_returns_its_size(tmp_path):
    data = os.urandom(3 * CHUNK + 5)
    (tmp_path / "a.enc").write_bytes(encrypt(data))
    (tmp_path / "restored").write_bytes(b"stale")
    assert bc.decrypt_file(tmp_path / "a.enc", tmp_path / "restored", bc.KeyRing(OLD_KEY)) == len(data)
    assert (tmp_path / "restored").read_bytes() == data
    assert stat.S_IMODE((tmp_path / "restored").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.enc", "restored"]


def test_read_header_tells_version_and_key_id_without_any_key():
    blob = encrypt(b"hello", keys=f"{NEW_KEY},{OLD_KEY}")
    stream = io.BytesIO(blob)
    assert bc.read_header(stream) == bc.HeaderInfo(version=1, key_id=bc.KeyRing(NEW_KEY).current_id)
    assert stream.tell() == bc.HEADER_SIZE
    assert not bc.is_encrypted(b"\x28\xb5\x2f\xfd")  # a zstd frame
    assert not bc.is_encrypted(b"")


def test_memory_stays_flat_while_300_mb_stream_through_encrypt_and_decrypt():
    # A child process measures its own peak RSS: encrypt a generator into a pipe
    # from a thread while the main thread decrypts the other end.
    script = textwrap.dedent(
        """
        import hashlib, os, resource, threading
        from engines import backupcrypto as bc
        ring = bc.KeyRing("m" * 40)
        block = os.urandom(1 << 20)
        def source():
            for i in range(300):
                yield block[i:] + block[:i]
        sent, got = hashlib.sha256(), hashlib.sha256()
        r, w = os.pipe()
        def produce():
            with os.fdopen(w, "wb") as out, bc.EncryptingWriter(out, ring) as writer:
                for piece in source():
                    sent.update(piece)
                    writer.write(piece)
        t = threading.Thread(target=produce)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t.start()
        class Sink:
            n = 0
            def write(self, b):
                got.update(b)
                self.n += len(b)
        with os.fdopen(r, "rb") as src:
            n = bc.decrypt_stream(src, Sink(), ring)
        t.join()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(n, sent.hexdigest() == got.hexdigest(), (peak - base) // 1024)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    size, same, growth_mb = done.stdout.split()
    assert (int(size), same) == (300 << 20, "True")
    assert int(growth_mb) < 100, f"peak RSS grew by {growth_mb} MB while streaming 300 MB"


# --- wrong key, tampering, truncation ------------------------------------------------
def test_wrong_key_names_the_missing_key_id_and_leaves_no_output(tmp_path):
    blob = encrypt(b"secret rows" * 1000, keys=OLD_KEY)
    message = decrypt_file_fails(tmp_path, blob, keys=NEW_KEY)
    old_id = bc.KeyRing(OLD_KEY).current_id
    assert f"key id {old_id}" in message and "not in KASA_BACKUP_KEYS" in message


def test_header_pointing_at_another_configured_key_is_reported_as_altered(tmp_path):
    blob = encrypt(b"x" * 5000, keys=OLD_KEY)
    new_id = bytes.fromhex(bc.KeyRing(NEW_KEY).current_id)
    forged = blob[:9] + new_id + blob[17:]
    message = decrypt_file_fails(tmp_path, forged, keys=f"{NEW_KEY},{OLD_KEY}")
    assert "header" in message and "altered" in message


def test_decrypt_refuses_every_single_flipped_byte():
    blob = encrypt(os.urandom(2 * CHUNK + 100))
    for pos in range(len(blob)):
        for mask in (0x01, 0x80):
            with pytest.raises(bc.BackupDecryptError):
                decrypt(flip(blob, pos, mask))


@pytest.mark.parametrize(
    "where, expected",
    [
        ("magic", "not a Kasa encrypted"),
        ("version", "unsupported encrypted artifact version"),
        ("key id", "not in KASA_BACKUP_KEYS"),
        ("wrap nonce", "header"),
        ("wrapped key", "header"),
        ("cobblestone prefix", "tampered"),
        ("middle", "tampered"),
        ("last byte", "truncated"),
    ],
)
def test_flipped_byte_gives_a_clear_error_and_no_output_file(tmp_path, where, expected):
    blob = encrypt(os.urandom(5 * CHUNK))
    pos = {
        "magic": 0,
        "version": 8,
        "key id": 9,
        "wrap nonce": 17,
        "wrapped key": 29,
        "cobblestone prefix": bc.HEADER_SIZE + 3,
        "middle": len(blob) // 2,
        "last byte": len(blob) - 1,
    }[where]
    assert expected in decrypt_file_fails(tmp_path, flip(blob, pos))


@pytest.mark.parametrize(
    "cut",
    ["last byte", "last chunk", "whole body", "half the header", "everything"],
)
def test_truncation_is_detected(tmp_path, cut):
    blob = encrypt(os.urandom(4 * CHUNK + 77))
    last_chunk_start = BODY + 4 * CT_CHUNK
    keep = {
        "last byte": len(blob) - 1,
        "last chunk": last_chunk_start,  # ends cleanly on a chunk boundary
        "whole body": bc.HEADER_SIZE,
        "half the header": bc.HEADER_SIZE // 2,
        "everything": 0,
    }[cut]
    message = decrypt_file_fails(tmp_path, blob[:keep])
    assert "truncated" in message or "not a Kasa" in message


def test_truncated_stream_leaks_authenticated_chunks_which_is_why_decrypt_file_exists(tmp_path):
    data = os.urandom(8 * CHUNK + 100)
    blob = encrypt(data)[:-1]
    partial = io.BytesIO()
    with pytest.raises(bc.BackupDecryptError, match="truncated"):
        bc.decrypt_stream(io.BytesIO(blob), partial, bc.KeyRing(OLD_KEY))
    assert 0 < len(partial.getvalue()) < len(data)  # the stream API did hand out a prefix
    decrypt_file_fails(tmp_path, blob)  # the file API leaves nothing


def test_appended_bytes_are_refused():
    blob = encrypt(b"payload" * 100)
    with pytest.raises(bc.BackupDecryptError):
        decrypt(blob + b"\x00")


def test_aborted_writer_never_finalizes_so_the_artifact_stays_undecryptable(tmp_path):
    out = io.BytesIO()
    with pytest.raises(RuntimeError):
        with bc.EncryptingWriter(out, bc.KeyRing(OLD_KEY)) as writer:
            writer.write(os.urandom(3 * CHUNK + 10))
            raise RuntimeError("disk full")
    assert writer.closed
    assert "truncated" in decrypt_file_fails(tmp_path, out.getvalue())


def test_reordered_chunks_are_refused(tmp_path):
    blob = encrypt(os.urandom(4 * CHUNK + 10))
    chunks = [blob[BODY + i * CT_CHUNK : BODY + (i + 1) * CT_CHUNK] for i in range(4)]
    swapped = blob[:BODY] + chunks[1] + chunks[0] + b"".join(chunks[2:]) + blob[BODY + 4 * CT_CHUNK :]
    assert len(swapped) == len(blob)
    assert "tampered" in decrypt_file_fails(tmp_path, swapped)


def test_spliced_files_are_refused(tmp_path):
    one, two = encrypt(os.urandom(3 * CHUNK + 1)), encrypt(os.urandom(3 * CHUNK + 1))
    header_swap = one[: bc.HEADER_SIZE] + two[bc.HEADER_SIZE :]
    body_swap = one[:BODY] + two[BODY:]
    tail_swap = one[: BODY + CT_CHUNK] + two[BODY + CT_CHUNK :]
    for spliced in (header_swap, body_swap, tail_swap):
        decrypt_file_fails(tmp_path, spliced)


# --- rotation --------------------------------------------------------------------------
def test_rotation_keeps_old_artifacts_readable_and_uses_the_new_key_for_new_ones(tmp_path):
    old_blob = encrypt(b"made before rotation", keys=OLD_KEY)
    rotated = f"{NEW_KEY},{OLD_KEY}"
    assert decrypt(old_blob, keys=rotated) == b"made before rotation"
    out = io.BytesIO()
    with bc.EncryptingWriter(out, bc.KeyRing(rotated)) as writer:
        writer.write(b"made after rotation")
    new_id, old_id = bc.KeyRing(NEW_KEY).current_id, bc.KeyRing(OLD_KEY).current_id
    assert writer.key_id == new_id
    assert bc.read_header(io.BytesIO(out.getvalue())).key_id == new_id
    assert bc.read_header(io.BytesIO(old_blob)).key_id == old_id
    assert decrypt(out.getvalue(), keys=NEW_KEY) == b"made after rotation"
    message = decrypt_file_fails(tmp_path, old_blob, keys=NEW_KEY)
    assert old_id in message and "KASA_BACKUP_KEYS" in message


def test_error_messages_never_contain_key_material(tmp_path):
    ring = bc.KeyRing(f"{NEW_KEY},{OLD_KEY}")
    secrets_ = [NEW_KEY, OLD_KEY] + [ring.kek(i).hex() for i in ring.ids]
    blob = encrypt(os.urandom(2 * CHUNK), keys=OLD_KEY)
    messages = [
        decrypt_file_fails(tmp_path, blob, keys=NEW_KEY),
        decrypt_file_fails(tmp_path, flip(blob, 40), keys=OLD_KEY),
        decrypt_file_fails(tmp_path, flip(blob, BODY + 10), keys=OLD_KEY),
        decrypt_file_fails(tmp_path, blob[:-3], keys=OLD_KEY),
        str(bc.UnknownKeyId("ffffffffffffffff")),
    ]
    for message in messages:
        for secret in secrets_:
            assert secret not in message and secret[:20] not in message


# --- docs/FORMAT.md stays true ------------------------------------------------------------
def test_format_doc_recipe_decrypts_an_artifact_with_only_the_key(tmp_path):
    doc = (REPO / "docs" / "FORMAT.md").read_text()
    recipe = next(b for b in doc.split("```python\n")[1:] if "def decrypt_artifact" in b).split("```")[0]
    namespace: dict = {}
    exec(compile(recipe, "FORMAT.md", "exec"), namespace)  # our own documentation, run as written
    data = os.urandom(3 * CHUNK + 99)
    (tmp_path / "a.enc").write_bytes(encrypt(data, keys=f"{NEW_KEY},{OLD_KEY}"))
    namespace["decrypt_artifact"](str(tmp_path / "a.enc"), str(tmp_path / "plain"), NEW_KEY)
    assert (tmp_path / "plain").read_bytes() == data


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 7])
def test_artifact_bytes_follow_the_documented_layout(size):
    data = os.urandom(size)
    blob = encrypt(data)
    assert len(blob) == 77 + 56 + CT_CHUNK * (size // CHUNK) + size % CHUNK + 16
    header, body = blob[:77], blob[77:]
    assert header[:9] == b"KASAENC1\x01"
    id_material = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"kasa backup key id v1")
    assert header[9:17] == hashlib.sha256(id_material.derive(OLD_KEY.encode())).digest()[:8]
    kek = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"kasa backup kek v1").derive(OLD_KEY.encode())
    data_key = AESGCM(kek).decrypt(header[17:29], header[29:77], header[:29])
    info = b"c2sp.org/chunked-encryption@v1+AEAD_AES_256_GCM\x00" + body[:24] + header
    derived = HKDFExpand(algorithm=hashes.SHA512(), length=76, info=info).derive(data_key)
    assert body[24:56] == derived[44:]
    chunks, plain = body[56:], b""
    for i in range(size // CHUNK + 1):
        nonce = (int.from_bytes(derived[32:44], "big") ^ i).to_bytes(12, "big")
        plain += AESGCM(derived[:32]).decrypt(nonce, chunks[i * CT_CHUNK : (i + 1) * CT_CHUNK], None)
    assert plain == data
