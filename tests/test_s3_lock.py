"""Object Lock on a real S3 server (SeaweedFS): what a locked target promises, engine by engine.

Each test uses a fresh bucket made with Object Lock (fixture `locked_s3`); the credentials are Kasa's own, with
every S3 right, as a worker's key would have them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from engines.stores import StoreError, StoreLocked


def _write(store, name, data):
    with store.open_write(name) as w:
        w.write(data)
    return w.version_id


def test_a_locked_target_writes_every_object_with_its_retention_and_records_the_version(locked_s3):
    store = locked_s3.store(lock_mode="compliance", lock_days=2)
    before = datetime.now(UTC)
    small = _write(store, "c.example/1/backup.json", b"{}")
    big = _write(store, "c.example/1/backend.tar.zst", b"x" * (6 << 20))  # a multipart upload
    assert small and big and store.written == {"c.example/1/backup.json": small, "c.example/1/backend.tar.zst": big}
    for name, version in store.written.items():
        mode, until = store.retention(name, version)
        assert mode == "COMPLIANCE"
        assert before + timedelta(days=2) <= until <= datetime.now(UTC) + timedelta(days=2, minutes=1)


def test_reads_use_the_recorded_version_not_one_written_over_it(locked_s3):
    store = locked_s3.store(lock_mode="governance", lock_days=1)
    version = _write(store, "c.example/1/backup.json", b"genuine")
    client = locked_s3.client()
    client.put_object(Bucket=locked_s3.bucket, Key="c.example/1/backup.json", Body=b"forged by an attacker")
    client.delete_object(Bucket=locked_s3.bucket, Key="c.example/1/backup.json")  # and a delete marker on top
    reader = locked_s3.store()
    reader.pins = {"c.example/1/backup.json": version}
    with reader.open_read("c.example/1/backup.json") as fh:
        assert fh.read() == b"genuine"
    assert reader.size("c.example/1/backup.json") == len(b"genuine")
    assert reader.first_versions("c.example") == {"c.example/1/backup.json": version}


def test_a_compliance_lock_refuses_delete_and_shortening_and_kasa_reports_it_as_retained(locked_s3):
    store = locked_s3.store(lock_mode="compliance", lock_days=1)
    version = _write(store, "c.example/1/a.tar", b"data")
    client = locked_s3.client()
    with pytest.raises(Exception, match="AccessDenied"):
        client.delete_object(Bucket=locked_s3.bucket, Key="c.example/1/a.tar", VersionId=version)
    with pytest.raises(Exception, match="AccessDenied|InvalidRequest"):
        client.put_object_retention(Bucket=locked_s3.bucket, Key="c.example/1/a.tar", VersionId=version,
                                    Retention={"Mode": "COMPLIANCE",
                                               "RetainUntilDate": datetime.now(UTC) + timedelta(hours=1)})
    with pytest.raises(StoreLocked, match="retained by the object lock until") as err:
        store.delete_prefix("c.example/1")
    assert err.value.until > datetime.now(UTC) + timedelta(hours=23)
    with pytest.raises(StoreLocked):  # compliance: no bypass for anyone
        store.delete_prefix("c.example/1", bypass_governance=True)
    with store.open_read("c.example/1/a.tar") as fh:
        assert fh.read() == b"data"


def test_a_governance_lock_gives_way_only_to_an_explicit_bypass(locked_s3):
    store = locked_s3.store(lock_mode="governance", lock_days=1)
    _write(store, "c.example/1/a.tar", b"data")
    with pytest.raises(StoreLocked):
        store.delete_prefix("c.example/1")
    assert store.delete_prefix("c.example/1", bypass_governance=True) >= 1
    assert locked_s3.client().list_object_versions(Bucket=locked_s3.bucket).get("Versions", []) == []


def test_extending_a_retention_is_allowed_and_never_shortens(locked_s3):
    store = locked_s3.store(lock_mode="compliance", lock_days=1)
    version = _write(store, "c.example/1/a.tar", b"data")
    later = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    assert store.extend_retention("c.example/1/a.tar", version, later) == later
    assert store.retention("c.example/1/a.tar", version)[1] == later
    assert store.extend_retention("c.example/1/a.tar", version, later - timedelta(days=1)) == later


def test_a_locked_target_on_a_bucket_without_object_lock_is_refused_with_the_reason(s3_server, locked_s3):
    with pytest.raises(StoreError, match="no Object Lock.*created") as err:
        s3_server.store(lock_mode="compliance", lock_days=7).check()
    assert "versioning is off" in str(err.value) and s3_server.secret_key not in str(err.value)
    message = locked_s3.store(lock_mode="compliance", lock_days=7).check()
    assert "Object Lock and versioning enabled" in message
    assert locked_s3.client().list_object_versions(Bucket=locked_s3.bucket).get("Versions", []) == []


def test_a_missing_bucket_is_named_even_where_the_server_would_make_it_on_write(s3_server):
    from engines.stores.s3 import S3Store

    s = S3Store(s3_server.bucket + "-typo", endpoint_url=s3_server.endpoint, access_key=s3_server.access_key,
                secret_key=s3_server.secret_key)
    with pytest.raises(StoreError, match="the bucket does not exist"):
        s.check()
    names = [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    assert s3_server.bucket + "-typo" not in names


def test_lock_settings_are_validated():
    from engines.stores.s3 import S3Store

    with pytest.raises(StoreError, match="governance or compliance"):
        S3Store("b", endpoint_url="http://127.0.0.1:1", lock_mode="forever", lock_days=1)
    with pytest.raises(StoreError, match="at least 1 lock day"):
        S3Store("b", endpoint_url="http://127.0.0.1:1", lock_mode="compliance", lock_days=0)
