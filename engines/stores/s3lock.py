"""S3 versioning and Object Lock for S3Store: written once, read as written, deleted only when the lock allows.

Why these rules (docs/STORAGE.md):
- Object Lock works on object *versions*. Anyone holding Kasa's keys can always add a newer version of a key or a
  delete marker; neither touches the locked version. So the catalogue records the version id of every object it
  wrote and reads exactly that version, and a catalogue rebuild takes each key's *first* version (Kasa never writes
  a key twice).
- COMPLIANCE: nobody shortens or deletes until the date. GOVERNANCE: a holder of s3:BypassGovernanceRetention can.
  Extending a retain-until is allowed in both modes: that is how a full stays locked as long as its newest
  differential.
- A lock is checked on the bucket before trusting the target: Object Lock is switched on when a bucket is made
  and requires versioning; a target that promises locks on a bucket without them would lock nothing.
"""

from __future__ import annotations

import os
import secrets as _secrets
from datetime import UTC, datetime, timedelta

from botocore.exceptions import BotoCoreError, ClientError

from .base import PROBE_PREFIX, StoreError, StoreLocked, scrub

MODES = ("GOVERNANCE", "COMPLIANCE")


def lock_setting(mode: str | None, days: int) -> tuple[str, int]:
    if not mode:
        return "", 0
    mode = mode.upper()
    if mode not in MODES:
        raise StoreError(f"S3 target: object lock mode must be governance or compliance, not {mode.lower()!r}")
    if int(days) < 1:
        raise StoreError("S3 target: a locked target needs at least 1 lock day")
    return mode, int(days)


def until_from_now(days: int, now: datetime | None = None) -> datetime:
    # Whole seconds: S3 stores the date to the second and compares what it returns with what we recorded.
    return ((now or datetime.now(UTC)) + timedelta(days=days)).replace(microsecond=0) + timedelta(seconds=1)


def lock_args(store) -> dict:
    if not store.lock_mode:
        return {}
    until = store.retain_until or until_from_now(store.lock_days)
    return {"ObjectLockMode": store.lock_mode, "ObjectLockRetainUntilDate": until}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def bucket_versioned(store) -> bool:
    try:
        status = store.client.get_bucket_versioning(Bucket=store.bucket).get("Status")
    except (BotoCoreError, ClientError) as exc:
        raise store.fail(exc, "reading the versioning of") from None
    return status in ("Enabled", "Suspended")


def check_bucket(store) -> None:
    """The bucket exists (some servers make a missing bucket on the first write) and, on a locked target, has
    Object Lock and versioning enabled."""
    try:
        store.client.head_bucket(Bucket=store.bucket)
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if _code(exc) in ("404", "NoSuchBucket", "NotFound") or status == 404:
            raise StoreError(scrub(f"S3 {store.where()}: the bucket does not exist", store._secrets)) from None
        raise store.fail(exc, "checking") from None
    except BotoCoreError as exc:
        raise store.fail(exc, "checking") from None
    if not store.lock_mode:
        return
    problems = lock_problems(store)
    if problems:
        raise StoreError(scrub(
            f"S3 {store.where()}: the target promises {store.lock_mode.lower()} object locks of {store.lock_days} "
            f"day(s) but {' and '.join(problems)}. Object Lock can only be switched on when a bucket is created: "
            "make a new bucket with Object Lock enabled (docs/STORAGE.md) and point the target at it",
            store._secrets))


def lock_problems(store) -> list[str]:
    problems = []
    try:
        status = store.client.get_bucket_versioning(Bucket=store.bucket).get("Status")
    except (BotoCoreError, ClientError) as exc:
        raise store.fail(exc, "reading the versioning of") from None
    if status != "Enabled":
        problems.append(f"its versioning is {(status or 'off').lower()}")
    try:
        config = store.client.get_object_lock_configuration(Bucket=store.bucket).get("ObjectLockConfiguration", {})
        enabled = config.get("ObjectLockEnabled") == "Enabled"
    except ClientError as exc:
        if "ObjectLockConfiguration" not in _code(exc) and _code(exc) not in ("404", "NotFound"):
            raise store.fail(exc, "reading the object lock configuration of") from None
        enabled = False
    except BotoCoreError as exc:
        raise store.fail(exc, "reading the object lock configuration of") from None
    if not enabled:
        problems.append("the bucket has no Object Lock")
    return problems


def probe_unlocked(store) -> str:
    """The probe of a locked target: written *without* a lock (else it would stay for lock_days), read back, and
    its version deleted."""
    describe = f"S3 {store.where(store.prefix)}"
    key = store._key(f"{PROBE_PREFIX}-{_secrets.token_hex(6)}")
    payload = os.urandom(1024)
    try:
        version = store.client.put_object(Bucket=store.bucket, Key=key, Body=payload).get("VersionId")
        got = store.client.get_object(Bucket=store.bucket, Key=key, VersionId=version)["Body"].read()
    except (BotoCoreError, ClientError) as exc:
        raise store.fail(exc, "probing", key) from None
    if got != payload:
        raise StoreError(f"{describe}: the probe object read back differs from what was written")
    note = ""
    try:
        store.client.delete_object(Bucket=store.bucket, Key=key, VersionId=version)
    except ClientError as exc:
        if _code(exc) != "AccessDenied":
            raise store.fail(exc, "deleting the probe", key) from None
        note = " (the bucket's default retention keeps the probe's version until it ends)"
    return (f"{describe}: Object Lock and versioning enabled; objects are written {store.lock_mode.lower()}-locked "
            f"for {store.lock_days} day(s); wrote, read back and deleted a probe object{note}")


def retention(store, name: str, version: str | None) -> tuple[str, datetime] | None:
    """(mode, retain-until) of the object version, or None when it has no lock."""
    key = store._key(name)
    try:
        resp = store.client.get_object_retention(Bucket=store.bucket, Key=key, **({"VersionId": version}
                                                                                   if version else {}))
    except ClientError as exc:
        code = _code(exc)
        # AWS: NoSuchObjectLockConfiguration for an unlocked version; SeaweedFS: ObjectLockConfigurationNotFound…
        if "ObjectLockConfiguration" in code:
            return None
        raise store.fail(exc, "reading the retention of", key) from None
    except BotoCoreError as exc:
        raise store.fail(exc, "reading the retention of", key) from None
    ret = resp.get("Retention") or {}
    if not ret.get("RetainUntilDate"):
        return None
    return str(ret.get("Mode", "")), ret["RetainUntilDate"].astimezone(UTC)


def extend_retention(store, name: str, version: str | None, until: datetime) -> datetime | None:
    """Make the version's lock last at least until `until` (never shortens); returns the date now in force."""
    current = retention(store, name, version)
    if current is not None and current[1] >= until:
        return current[1]
    mode = current[0] if current else store.lock_mode
    if not mode:
        return None
    key = store._key(name)
    try:
        store.client.put_object_retention(Bucket=store.bucket, Key=key, Retention={"Mode": mode,
                                                                                   "RetainUntilDate": until},
                                          **({"VersionId": version} if version else {}))
    except (BotoCoreError, ClientError) as exc:
        raise store.fail(exc, "extending the retention of", key) from None
    return until


def _versions(store, folder: str):
    """(key, version id, is delete marker, last modified) of everything under the folder, newest first per key."""
    pages = store.client.get_paginator("list_object_versions").paginate(Bucket=store.bucket, Prefix=folder)
    for page in pages:
        for v in page.get("Versions", []):
            yield v["Key"], v["VersionId"], False, v.get("LastModified")
        for m in page.get("DeleteMarkers", []):
            yield m["Key"], m["VersionId"], True, m.get("LastModified")


def first_versions(store, folder: str) -> dict[str, str]:
    """Name -> the first (oldest) real version of each key under the folder, whatever markers or newer versions
    were added later. S3 lists a key's versions newest first (ListObjectVersions): the last one listed is the
    first written. (Dates are no help: versions written in the same second tie.)"""
    oldest: dict[str, str] = {}
    try:
        pages = store.client.get_paginator("list_object_versions").paginate(Bucket=store.bucket, Prefix=folder)
        for page in pages:
            for v in page.get("Versions", []):
                if v.get("VersionId") not in (None, "null"):
                    oldest[store._name(v["Key"])] = v["VersionId"]
    except (BotoCoreError, ClientError) as exc:
        raise store.fail(exc, "listing the versions of", folder) from None
    return dict(sorted(oldest.items()))


def delete_versions(store, folder: str, *, bypass_governance: bool = False) -> int:
    """Every version and delete marker under the folder, and incomplete uploads; locked versions stay and raise
    StoreLocked naming the latest date among them once the rest is gone."""
    count, refused = 0, []
    extra = {"BypassGovernanceRetention": True} if bypass_governance else {}
    try:
        batch: list[dict] = []
        everything = list(_versions(store, folder))
        for i, (key, version, _marker, _modified) in enumerate(everything):
            batch.append({"Key": key, "VersionId": version})
            if len(batch) == 1000 or i == len(everything) - 1:
                resp = store.client.delete_objects(Bucket=store.bucket, Delete={"Objects": batch, "Quiet": True},
                                                   **extra)
                errors = resp.get("Errors") or []
                refused += [e for e in errors if e.get("Code") == "AccessDenied"]
                others = [e for e in errors if e.get("Code") != "AccessDenied"]
                if others:
                    first = others[0]
                    raise StoreError(scrub(f"S3 deleting {store.where(first.get('Key', ''))}: {first.get('Code')}: "
                                           f"{first.get('Message', '')} ({len(others)} version(s) not deleted)",
                                           store._secrets))
                count += len(batch) - len(errors)
                batch = []
        for page in store.client.get_paginator("list_multipart_uploads").paginate(Bucket=store.bucket,
                                                                                  Prefix=folder):
            for up in page.get("Uploads", []):
                store.client.abort_multipart_upload(Bucket=store.bucket, Key=up["Key"], UploadId=up["UploadId"])
                count += 1
    except (BotoCoreError, ClientError) as exc:
        raise store.fail(exc, "deleting", folder) from None
    if refused:
        untils = []
        for e in refused[:50]:  # enough to name the date; a backup holds a handful of objects
            ret = retention(store, store._name(e["Key"]), e.get("VersionId"))
            if ret:
                untils.append(ret[1])
        if not untils:  # refused, but no lock in force: a missing permission, not a lock
            raise StoreError(scrub(f"S3 deleting {store.where(folder)}: access denied for {len(refused)} object "
                                   "version(s) (check the credentials' s3:DeleteObjectVersion permission)",
                                   store._secrets))
        until = max(untils)
        raise StoreLocked(f"S3 {store.where(folder)}: {len(refused)} object version(s) are retained by the object "
                          f"lock until {until:%Y-%m-%d %H:%M:%S} UTC; {count} other(s) deleted", until=until)
    return count
