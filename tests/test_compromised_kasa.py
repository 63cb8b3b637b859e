"""The compromised-Kasa test (issue 17, point 6): an attacker holds the worker — Kasa's own S3 keys, its database,
its commands — and tries to destroy a customer's history and its live instance. The backup on a compliance-locked
bucket of a real S3 server (SeaweedFS) survives all of it, Kasa restores it in place with every file and row back,
and a catalogue rebuilt from the bucket ignores what the attacker wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime, timedelta

import pytest
from botocore.exceptions import ClientError

from backups.catalogue import backup_import
from backups.models import Backup, StorageTarget
from backups.services import BackupInputError, backup_delete, global_policy, prune_customer
from tests.restore_helpers import command_json, pg_exec, pg_state, tree_state

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def victim(make_customer, pg_database):
    import psycopg

    with psycopg.connect(host=pg_database["host"], port=pg_database["port"], user=pg_database["user"],
                         password=pg_database["password"], dbname=pg_database["name"]) as con:
        con.execute("CREATE TABLE orders (id serial PRIMARY KEY, note text)")
        con.execute("INSERT INTO orders (note) SELECT 'order ' || g FROM generate_series(1, 5000) g")
    pg_exec(pg_database, f'ALTER ROLE "{pg_database["user"]}" CREATEDB', dbname="postgres")
    customer = make_customer(services=("backend", "admin", "store"), databases=[("main", pg_database["url"])])
    root = customer.root_path()
    for svc in ("backend", "admin", "store"):
        (root / svc / "src").mkdir(parents=True, exist_ok=True)
        (root / svc / "src" / "app.js").write_text(f"console.log('{svc}')\n")
        (root / svc / "src" / "data.bin").write_bytes(os.urandom(300_000))
        (root / svc / ".env").write_text(f"SERVICE={svc}\n")
    return customer


def _refused(call, *codes: str) -> str:
    try:
        call()
    except ClientError as exc:
        code = exc.response["Error"]["Code"]
        assert code in codes, f"refused with {code}, expected one of {codes}"
        return code
    raise AssertionError("the S3 server allowed it")


def test_a_compromised_kasa_cannot_destroy_a_locked_backup_and_kasa_restores_it(victim, pg_database, locked_s3,
                                                                                  admin_user):
    target = locked_s3.target("vault", lock_mode="compliance", lock_days=1)
    policy = global_policy()
    policy.target = target
    policy.save()
    root = victim.root_path()
    before = {"tree": tree_state(root), "pg": pg_state(pg_database)}
    code, doc = command_json("backup", victim.domain)
    assert code == 0, doc
    good = Backup.objects.get(pk=doc["id"])
    genuine = {key: locked_s3.client().get_object(Bucket=locked_s3.bucket, Key=key, VersionId=v)["Body"].read()
               for key, v in good.versions.items()}

    # --- the attacker, with Kasa's own S3 credentials (as stored in the target) -----------------------------
    s3 = locked_s3.client()
    bucket = locked_s3.bucket
    versions = s3.list_object_versions(Bucket=bucket, Prefix=good.prefix + "/")["Versions"]
    assert {v["Key"]: v["VersionId"] for v in versions} == good.versions
    for v in versions:  # delete every version, one by one and in a batch
        _refused(lambda v=v: s3.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"]), "AccessDenied")
    errors = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": v["Key"], "VersionId": v["VersionId"]}
                                                                  for v in versions]}).get("Errors", [])
    assert len(errors) == len(versions)
    for v in versions:  # shorten the retention, or turn it into a governance lock it could bypass
        _refused(lambda v=v: s3.put_object_retention(
            Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"],
            Retention={"Mode": "COMPLIANCE", "RetainUntilDate": datetime.now(UTC) + timedelta(minutes=1)}),
            "AccessDenied", "InvalidRequest")
        _refused(lambda v=v: s3.put_object_retention(
            Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"], BypassGovernanceRetention=True,
            Retention={"Mode": "GOVERNANCE", "RetainUntilDate": datetime.now(UTC) + timedelta(minutes=1)}),
            "AccessDenied", "InvalidRequest")
    for v in versions:  # write new content over the manifest and every artifact, then hide them behind markers
        s3.put_object(Bucket=bucket, Key=v["Key"], Body=b"encrypted by ransomware, pay to get it back")
        s3.delete_object(Bucket=bucket, Key=v["Key"])
    assert s3.list_objects_v2(Bucket=bucket, Prefix=good.prefix + "/").get("KeyCount", 0) == 0
    _refused(lambda: s3.delete_bucket(Bucket=bucket), "BucketNotEmpty", "AccessDenied")

    # --- the attacker wrecks the live instance ------------------------------------------------------------------
    import shutil

    for f in (root / "store" / "src").iterdir():  # every file in another overwritten
        f.write_bytes(b"\x00" * 1000)
    (root / "backend" / ".env").write_text("SERVICE=pwned\n")
    pg_exec(pg_database, "DELETE FROM orders WHERE id > 10", as_owner=True)

    # --- and turns Kasa's own tools against the backup ----------------------------------------------------------
    with pytest.raises(BackupInputError, match="locked until"):
        backup_delete(good, actor=admin_user)
    with pytest.raises(BackupInputError, match="compliance lock"):
        backup_delete(good, actor=admin_user, bypass_governance=True,
                      confirmation=f"bypass the lock of backup #{good.pk}")
    policy.keep_last = 1
    policy.full_every_days = 1
    policy.save()
    code, wrecked = command_json("backup", victim.domain)  # a backup of the wrecked instance becomes the newest,
    assert code == 0, wrecked  # and the retention that follows it drops the good one…
    prune_customer(victim, via="cli")  # …as does any prune run by hand
    good.refresh_from_db()
    assert good.status == "expired" and "locked until" in good.error
    shutil.rmtree(root / "admin")  # and, last, one service folder deleted outright
    for key, v in good.versions.items():  # every genuine version still there, byte for byte
        assert s3.get_object(Bucket=bucket, Key=key, VersionId=v)["Body"].read() == genuine[key]

    # --- Kasa restores the good backup in place -----------------------------------------------------------------
    code, run = command_json("restore", str(good.pk), "--yes")
    assert code == 0 and run["status"] == "succeeded", run
    after = {"tree": tree_state(root), "pg": pg_state(pg_database)}
    assert after["pg"] == before["pg"]
    assert after["tree"] == before["tree"]

    # --- docs/FORMAT.md's by-hand rule: ListObjectVersions lists a key's versions newest first, take the last ----
    by_hand = {}
    for v in s3.list_object_versions(Bucket=bucket, Prefix=good.prefix + "/")["Versions"]:
        by_hand[v["Key"]] = v["VersionId"]  # later entries of a key are older: the last one is Kasa's write
    assert by_hand == good.versions
    manifest = s3.get_object(Bucket=bucket, Key=f"{good.prefix}/backup.json",
                             VersionId=by_hand[f"{good.prefix}/backup.json"])["Body"].read()
    for art in json.loads(manifest)["artifacts"]:
        body = s3.get_object(Bucket=bucket, Key=f"{good.prefix}/{art['name']}",
                             VersionId=by_hand[f"{good.prefix}/{art['name']}"])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == art["sha256"]

    # --- a catalogue rebuilt from the bucket ignores the attacker's versions and delete markers ----------------
    rebuilt = StorageTarget.objects.create(name="vault-rebuilt", kind="s3", bucket=bucket,
                                           endpoint_url=locked_s3.endpoint, region=locked_s3.region,
                                           access_key=locked_s3.access_key, secret_key=locked_s3.secret_key,
                                           lock_mode="compliance", lock_days=1)
    result = backup_import(rebuilt)
    assert not result.refused, result.document()
    imported = Backup.objects.get(target=rebuilt, prefix=good.prefix)
    assert imported.versions == good.versions
    assert imported.lock_mode == "compliance" and imported.locked_until >= good.locked_until.replace(microsecond=0)
    assert imported.manifest == good.manifest
