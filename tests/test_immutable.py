"""Immutable backups (issue 17, points 2-5): backups on an S3 target with Object Lock, on a real SeaweedFS server.

Every object is written locked and its version id recorded; a differential keeps its full locked as long as
itself; retention and deletion expect the lock; drills read each object's retention back. Real backups through
the management commands; the customer is on the local host.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from audit.models import AuditEntry
from backups import locks
from backups.models import Backup, StorageTarget
from backups.services import BackupInputError, backup_delete, global_policy
from operations.models import RunLogLine
from tests.restore_helpers import command_json

pytestmark = pytest.mark.django_db(transaction=True)


def _log(run_id: int) -> str:
    return "\n".join(RunLogLine.objects.filter(run_id=run_id).values_list("text", flat=True))


@pytest.fixture
def customer(make_customer):
    c = make_customer(services=("backend", "admin"))
    for svc in ("backend", "admin"):
        d = c.root_path() / svc
        (d / "src").mkdir(parents=True, exist_ok=True)
        (d / "src" / "app.js").write_text(f"console.log('{svc}')\n")
        (d / "src" / "blob.bin").write_bytes(os.urandom(200_000))
    return c


def _use(target: StorageTarget, *, replica: bool = False, **policy):
    p = global_policy()
    if replica:
        p.replicas.add(target)
    else:
        p.target = target
    for k, v in policy.items():
        setattr(p, k, v)
    p.save()
    return p


def _backup(customer, *args) -> dict:
    code, doc = command_json("backup", customer.domain, *args)
    assert code == 0, doc
    return doc


def _objects(s3, prefix: str) -> list[dict]:
    return [v for v in s3.client().list_object_versions(Bucket=s3.bucket, Prefix=prefix + "/").get("Versions", [])]


def _retention(s3, key: str, version: str):
    r = s3.client().get_object_retention(Bucket=s3.bucket, Key=key, VersionId=version)["Retention"]
    return r["Mode"], r["RetainUntilDate"].astimezone(UTC)


def test_every_object_of_a_backup_on_a_locked_target_is_locked_and_its_version_recorded(customer, locked_s3):
    _use(locked_s3.target(lock_mode="compliance", lock_days=3))
    doc = _backup(customer)
    bk = Backup.objects.get(pk=doc["id"])
    assert bk.lock_mode == "compliance"
    left = bk.locked_until - datetime.now(UTC)
    assert timedelta(days=3) - timedelta(minutes=5) < left <= timedelta(days=3, seconds=2)
    stored = _objects(locked_s3, bk.prefix)
    # every artifact, file index and the manifest: each recorded with the version that holds it
    assert {v["Key"]: v["VersionId"] for v in stored} == bk.versions
    assert f"{bk.prefix}/backup.json" in bk.versions and len(bk.versions) >= 5
    for key, version in bk.versions.items():
        assert _retention(locked_s3, key, version) == ("COMPLIANCE", bk.locked_until.replace(microsecond=0))
    assert "compliance-locked" in _log(doc["run"])
    code, run = command_json("verify", str(bk.pk))
    assert code == 0 and run["status"] == "succeeded", run
    assert "object locks on" in _log(run["id"])


def test_a_differential_keeps_its_full_locked_at_least_as_long(customer, locked_s3):
    _use(locked_s3.target(lock_mode="governance", lock_days=1))
    full = Backup.objects.get(pk=_backup(customer)["id"])
    time.sleep(1.5)  # the differential's lock ends measurably later
    (customer.root_path() / "backend" / "src" / "app.js").write_text("console.log('v2')\n")
    diff = Backup.objects.get(pk=_backup(customer)["id"])
    assert diff.kind == "differential" and diff.base_id == full.pk
    full.refresh_from_db()
    assert diff.locked_until > full.created_at + timedelta(days=1)
    assert full.locked_until == diff.locked_until
    for key, version in full.versions.items():
        assert _retention(locked_s3, key, version)[1] >= diff.locked_until.replace(microsecond=0)
    assert f"full backup #{full.pk} on" in _log(diff.run_id) and "as long as" in _log(diff.run_id)


def test_a_drill_flags_a_shortened_lock_and_a_chain_whose_full_unlocks_first(customer, locked_s3):
    _use(locked_s3.target(lock_mode="governance", lock_days=1))
    full = Backup.objects.get(pk=_backup(customer)["id"])
    (customer.root_path() / "admin" / "src" / "app.js").write_text("console.log('admin v2')\n")
    diff = Backup.objects.get(pk=_backup(customer)["id"])
    full.refresh_from_db()
    # Someone with the governance bypass right shortens the lock of one of the full's archives.
    key = next(k for k in full.versions if k.endswith("backend.tar.zst.enc"))
    locked_s3.client().put_object_retention(
        Bucket=locked_s3.bucket, Key=key, VersionId=full.versions[key], BypassGovernanceRetention=True,
        Retention={"Mode": "GOVERNANCE", "RetainUntilDate": datetime.now(UTC) + timedelta(hours=2)})
    code, run = command_json("verify", str(diff.pk))
    assert code != 0
    assert f"chain: full backup #{full.pk}" in run["error"] and "before this differential" in run["error"]
    code, run = command_json("verify", str(full.pk))
    assert code != 0 and "backend.tar.zst.enc" in run["error"] and "locked only until" in run["error"]
    assert Backup.objects.get(pk=full.pk).verify_status == "failed"


def test_retention_expires_a_locked_backup_and_deletes_it_after_the_lock_ends(customer, locked_s3, monkeypatch):
    # A real compliance lock of a few seconds (lock days are whole days): the server enforces it all the same.
    monkeypatch.setattr(locks, "until_from_now",
                        lambda days, now=None: (datetime.now(UTC) + timedelta(seconds=6)).replace(microsecond=0))
    _use(locked_s3.target(lock_mode="compliance", lock_days=1), keep_last=1, full_every_days=1)
    first = Backup.objects.get(pk=_backup(customer)["id"])
    second = _backup(customer)
    first.refresh_from_db()
    assert first.status == "expired" and "locked until" in first.error
    assert first.purge_after == first.locked_until
    assert "retention" in _log(second["run"])
    assert len(_objects(locked_s3, first.prefix)) == len(first.versions)  # all still there
    assert first.restorable  # whole on its target until the lock ends
    while datetime.now(UTC) <= first.locked_until + timedelta(seconds=1):
        time.sleep(0.5)
    code, docs = command_json("prune", customer.domain)
    assert code == 0, docs
    first.refresh_from_db()
    assert first.status == "deleted" and first.purge_after is None
    assert _objects(locked_s3, first.prefix) == []
    assert AuditEntry.objects.filter(action="backup.purge", object_id=str(first.pk)).exists()


def test_deleting_a_locked_backup_says_until_when_and_only_a_superuser_bypasses_governance(
        customer, locked_s3, admin_user, staff_user):
    _use(locked_s3.target(lock_mode="governance", lock_days=2))
    bk = Backup.objects.get(pk=_backup(customer)["id"])
    with pytest.raises(BackupInputError, match=r"locked until \d{4}-\d\d-\d\d .* cannot be deleted before then"):
        backup_delete(bk, actor=admin_user)
    with pytest.raises(BackupInputError, match="type exactly: bypass the lock of backup #"):
        backup_delete(bk, actor=admin_user, bypass_governance=True, confirmation="yes")
    from django.core.exceptions import PermissionDenied

    operator = staff_user(customer.team)  # the operators group: may delete backups, is no superuser
    with pytest.raises(PermissionDenied, match="superuser"):
        backup_delete(bk, actor=operator, bypass_governance=True, confirmation=f"bypass the lock of backup #{bk.pk}")
    assert Backup.objects.get(pk=bk.pk).status == "succeeded"
    assert len(_objects(locked_s3, bk.prefix)) == len(bk.versions)
    backup_delete(bk, actor=admin_user, bypass_governance=True, confirmation=f"bypass the lock of backup #{bk.pk}")
    assert Backup.objects.get(pk=bk.pk).status == "deleted"
    assert _objects(locked_s3, bk.prefix) == []
    entry = AuditEntry.objects.get(action="backup.delete_bypass_lock", object_id=str(bk.pk))
    assert entry.actor_id == admin_user.pk


def test_a_compliance_lock_cannot_be_bypassed_by_a_superuser(customer, locked_s3, admin_user):
    _use(locked_s3.target(lock_mode="compliance", lock_days=1))
    bk = Backup.objects.get(pk=_backup(customer)["id"])
    with pytest.raises(BackupInputError, match="compliance lock .* nobody can delete it"):
        backup_delete(bk, actor=admin_user, bypass_governance=True,
                      confirmation=f"bypass the lock of backup #{bk.pk}")
    assert len(_objects(locked_s3, bk.prefix)) == len(bk.versions)


def test_the_admin_delete_page_names_the_lock_date(customer, locked_s3, admin_client):
    _use(locked_s3.target(lock_mode="governance", lock_days=2))
    bk = Backup.objects.get(pk=_backup(customer)["id"])
    url = reverse("admin:backups_backup_changelist")
    page = admin_client.post(url, {"action": "delete_backups", "_selected_action": [bk.pk]})
    html = page.content.decode()
    assert f"locked until {bk.locked_until:%Y-%m-%d %H:%M} UTC" in html
    assert f"bypass the lock of backup #{bk.pk}" in html
    done = admin_client.post(url, {"action": "delete_backups", "_selected_action": [bk.pk], "confirm": "yes"},
                             follow=True)
    assert "locked until" in done.content.decode()
    assert Backup.objects.get(pk=bk.pk).status == "succeeded"


def test_a_locked_target_on_a_bucket_without_object_lock_cannot_be_saved_or_checked(s3_server, locked_s3, admin_user,
                                                                                    admin_client):
    from backups.admin import StorageTargetForm
    from backups.services import target_check

    def form(bucket):
        return StorageTargetForm(data={
            "name": f"t-{bucket[-6:]}", "kind": "s3", "bucket": bucket, "endpoint_url": s3_server.endpoint,
            "region": s3_server.region, "access_key": s3_server.access_key, "secret_key": s3_server.secret_key,
            "lock_mode": "compliance", "lock_days": 30, "enabled": "on"})

    bad = form(s3_server.bucket)
    assert not bad.is_valid() and "no Object Lock" in str(bad.errors["lock_mode"])
    assert s3_server.secret_key not in str(bad.errors)
    good = form(locked_s3.bucket)
    assert good.is_valid(), good.errors
    target = StorageTarget.objects.create(name="notlocked", kind="s3", bucket=s3_server.bucket,
                                          endpoint_url=s3_server.endpoint, region=s3_server.region,
                                          access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                                          lock_mode="compliance", lock_days=30)  # as if the bucket lost its lock
    with pytest.raises(BackupInputError, match="no Object Lock"):
        target_check(target, actor=admin_user)
    with pytest.raises(ValidationError, match="at least 1 lock day"):
        StorageTarget(name="x", kind="s3", bucket="b", lock_mode="governance", lock_days=0).full_clean()


def test_a_locked_replica_gets_locked_versioned_copies(customer, locked_s3):
    _use(locked_s3.target("offsite", lock_mode="compliance", lock_days=1), replica=True)
    doc = _backup(customer)
    bk = Backup.objects.get(pk=doc["id"])
    assert bk.locked_until is None and bk.versions == {}  # the primary is the local folder
    copy = bk.copies.get()
    assert copy.status == "succeeded" and copy.lock_mode == "compliance" and copy.locked_until
    assert {v["Key"]: v["VersionId"] for v in _objects(locked_s3, bk.prefix)} == copy.versions
    assert "compliance-locked until" in _log(doc["run"])
    assert locks.locked_until(bk) == copy.locked_until


def test_target_check_command_fails_for_a_locked_target_whose_bucket_lost_its_lock(s3_server, locked_s3):
    locked_s3.target("good", lock_mode="governance", lock_days=1)
    StorageTarget.objects.create(name="bad", kind="s3", bucket=s3_server.bucket, endpoint_url=s3_server.endpoint,
                                 region=s3_server.region, access_key=s3_server.access_key,
                                 secret_key=s3_server.secret_key, lock_mode="compliance", lock_days=7)
    code, docs = command_json("target_check", "good", "bad")
    assert code == 1
    by_name = {d["target"]: d for d in docs}
    assert by_name["good"]["ok"] and "Object Lock and versioning enabled" in by_name["good"]["detail"]
    assert not by_name["bad"]["ok"] and "no Object Lock" in by_name["bad"]["detail"]
    assert s3_server.secret_key not in str(docs)


def test_a_failed_locked_copy_is_purged_after_its_lock_and_the_primary_stays(customer, locked_s3, monkeypatch):
    from backups.models import BackupCopy
    from backups.services import purge_unlocked

    until = (datetime.now(UTC) + timedelta(seconds=4)).replace(microsecond=0)
    monkeypatch.setattr(locks, "until_from_now", lambda days, now=None: until)
    _use(locked_s3.target("offsite", lock_mode="compliance", lock_days=1), replica=True)
    bk = Backup.objects.get(pk=_backup(customer)["id"])
    copy = bk.copies.get()
    # As a copy that failed after writing some locked objects leaves it: failed, its leftovers due after the lock.
    BackupCopy.objects.filter(pk=copy.pk).update(status="failed", purge_after=until)
    assert purge_unlocked(customer) == [] and len(_objects(locked_s3, bk.prefix)) == len(copy.versions)
    while datetime.now(UTC) <= until + timedelta(seconds=1):
        time.sleep(0.5)
    purge_unlocked(customer)
    assert _objects(locked_s3, bk.prefix) == []
    bk.refresh_from_db()
    assert bk.status == "succeeded" and bk.target.store().exists(f"{bk.prefix}/backup.json")  # the primary stays
    assert BackupCopy.objects.get(pk=copy.pk).purge_after is None
