"""An S3 bucket (AWS or any S3-compatible service), through boto3's client directly.

Higher-level layers (django-storages, boto3's upload_fileobj with its default
transfer config) read or queue whole objects in memory; here an upload is a
multipart upload fed part by part (max_inflight - 1 parts uploading at once while the next fills: 3 by
default), so at most part_size × max_inflight bytes
are buffered whatever the object's size. An upload that does not commit is
aborted: S3 keeps (and bills) the parts of an incomplete upload forever
otherwise, and they never show in a plain listing.
"""

from __future__ import annotations

import collections
import io
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from . import s3lock
from .base import StoreError, StoreNotFound, StoreWriter, clean_name, clean_prefix, join, probe, scrub

MiB = 1 << 20
MIN_PART = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS = 10_000
# Past this many parts the part size doubles, so the 10,000-part cap allows objects of
# terabytes; the buffer bound part_size × max_inflight holds for the first 1,000 parts.
PARTS_PER_STEP = 1_000

_CODES = {
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "access denied (check the credentials' permissions on this bucket)",
    "InvalidAccessKeyId": "the access key id is not known to the server",
    "SignatureDoesNotMatch": "the secret key does not match the access key id",
    "NoSuchUpload": "the multipart upload no longer exists",
}


class S3Writer(StoreWriter):
    def __init__(self, store: S3Store, name: str, key: str):
        super().__init__(name)
        self._store, self._key = store, key
        # The part being filled: allocated at its full size once and filled in place (appending to a bytearray
        # reallocates and copies it as it grows); `_fill` bytes of it are data.
        self._buf = bytearray()
        self._fill = 0
        self._upload_id: str | None = None
        self._parts: list[dict] = []
        self._shipped = 0  # parts handed to the uploader (numbered from 1)
        self._pending: collections.deque[tuple[Future, int]] = collections.deque()
        self._inflight_bytes = 0
        self.peak_buffered = 0  # the most bytes this writer ever held in memory at once
        self.abort_error = ""  # set when aborting the multipart upload failed (it may linger)
        # max_inflight - 1 parts upload at once while the next one fills: one upload at a time left the link idle
        # between parts (bench/s3_bench.py: 0.76x a plain boto3 upload with two at once).
        self._pool = (ThreadPoolExecutor(store.max_inflight - 1, thread_name_prefix="s3-part")
                      if store.max_inflight > 1 else None)

    @property
    def buffered(self) -> int:
        return self._fill + self._inflight_bytes

    def _part_limit(self) -> int:
        return self._store.part_size << (self._shipped // PARTS_PER_STEP)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            limit = self._part_limit()
            if len(self._buf) != limit:
                self._buf = bytearray(limit)
            n = min(limit - self._fill, len(view))
            self._buf[self._fill:self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            self.peak_buffered = max(self.peak_buffered, self.buffered)
            if self._fill >= limit:
                self._ship()

    def _ship(self) -> None:
        """Hand the buffer to the uploader as the next part; block while too many are in flight."""
        s = self._store
        if self._shipped >= MAX_PARTS:
            raise StoreError(f"S3 upload of {s.where(self._key)}: more than {MAX_PARTS} parts")
        if self._upload_id is None:
            try:
                self._upload_id = s.client.create_multipart_upload(Bucket=s.bucket, Key=self._key,
                                                                   **s.lock_args())["UploadId"]
            except (BotoCoreError, ClientError) as exc:
                raise s.fail(exc, "starting the upload of", self._key) from None
        # Hand the part over: a full one without a copy, the last (short) one as the slice it holds.
        part = self._buf if self._fill == len(self._buf) else self._buf[:self._fill]
        self._buf, self._fill = bytearray(), 0
        self._shipped += 1
        number = self._shipped
        if self._pool is None:
            self._parts.append(self._upload(number, part))
            return
        while len(self._pending) >= self._store.max_inflight - 1:
            self._collect_one()
        self._inflight_bytes += len(part)
        self._pending.append((self._pool.submit(self._upload, number, part), len(part)))

    def _upload(self, number: int, part: bytearray) -> dict:
        s = self._store
        resp = s.client.upload_part(Bucket=s.bucket, Key=self._key, UploadId=self._upload_id,
                                    PartNumber=number, Body=part)
        return {"PartNumber": number, "ETag": resp["ETag"]}

    def _collect_one(self) -> None:
        future, size = self._pending.popleft()
        try:
            self._parts.append(future.result())
        except (BotoCoreError, ClientError) as exc:
            raise self._store.fail(exc, "uploading a part of", self._key) from None
        finally:
            self._inflight_bytes -= size

    def _commit(self) -> None:
        s = self._store
        try:
            if self._upload_id is None:  # it all fitted in one part: a plain PUT
                resp = s.client.put_object(Bucket=s.bucket, Key=self._key, Body=bytes(self._buf[:self._fill]),
                                           **s.lock_args())
                self._buf, self._fill = bytearray(), 0
            else:
                if self._fill:
                    self._ship()  # the last part may be smaller than 5 MiB
                while self._pending:
                    self._collect_one()
                parts = sorted(self._parts, key=lambda p: p["PartNumber"])
                resp = s.client.complete_multipart_upload(Bucket=s.bucket, Key=self._key, UploadId=self._upload_id,
                                                          MultipartUpload={"Parts": parts})
            self.version_id = resp.get("VersionId") or ""
            s.record_written(self.name, self.version_id)
        except (BotoCoreError, ClientError) as exc:
            raise s.fail(exc, "completing the upload of", self._key) from None
        finally:
            if self._pool:
                self._pool.shutdown(wait=True)

    def _abort(self) -> None:
        s = self._store
        for future, _ in self._pending:
            future.cancel()
        if self._pool:
            self._pool.shutdown(wait=True)  # a part still uploading would otherwise land after the abort
        self._pending.clear()
        self._inflight_bytes = 0
        self._buf, self._fill = bytearray(), 0
        if self._upload_id is None:
            return
        try:
            s.client.abort_multipart_upload(Bucket=s.bucket, Key=self._key, UploadId=self._upload_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                self.abort_error = str(s.fail(exc, "aborting the upload of", self._key))
        except BotoCoreError as exc:
            # S3 unreachable: the parts stay until delete_prefix() (which aborts uploads under
            # the backup's folder) or a bucket lifecycle rule removes them. Never mask the
            # error that made us abort.
            self.abort_error = str(s.fail(exc, "aborting the upload of", self._key))


class S3Reader(io.RawIOBase):
    """The object's StreamingBody, read on demand; transport errors become StoreError."""

    def __init__(self, body, store: S3Store, key: str):
        self._body, self._store, self._key = body, store, key

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        try:
            return self._body.read(None if size is None or size < 0 else size)
        except (BotoCoreError, OSError) as exc:
            raise self._store.fail(exc, "reading", self._key) from None

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3Store:
    kind = "s3"

    def __init__(
        self, bucket: str, *, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
        access_key: str | None = None, secret_key: str | None = None, part_size: int = 8 * MiB,
        max_inflight: int = 4, connect_timeout: float = 5, read_timeout: float = 60, max_attempts: int = 3,
        lock_mode: str | None = None, lock_days: int = 0,
    ):
        if not bucket:
            raise StoreError("S3 target: a bucket name is required")
        if part_size < MIN_PART:
            raise StoreError(f"S3 target: part_size must be at least {MIN_PART} bytes (S3's minimum)")
        if max_inflight not in range(1, 9):
            raise StoreError("S3 target: max_inflight must be 1 (upload in the writer) to 8 (seven parts uploading "
                             "while the next fills)")
        if bool(access_key) != bool(secret_key):
            raise StoreError("S3 target: give both the access key id and the secret key, or neither")
        self.bucket, self.prefix = bucket, clean_prefix(prefix)
        self.lock_mode, self.lock_days = s3lock.lock_setting(lock_mode, lock_days)
        # Set by the caller for a whole backup (every object the same date); else now + lock_days per object.
        self.retain_until = None
        # name -> version id of every object this store committed (the catalogue records them), and the versions
        # to read (pinned by the catalogue): an object written over a pinned one later is never read instead.
        self.written: dict[str, str] = {}
        self.pins: dict[str, str] = {}
        self._written_lock = threading.Lock()
        self._versioned: bool | None = None
        self.part_size, self.max_inflight = part_size, max_inflight
        self._secrets = (access_key, secret_key)
        self.endpoint = _without_userinfo(endpoint_url) if endpoint_url else ""
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},  # "S3 down" fails in seconds
            signature_version="s3v4",
            # A custom endpoint (MinIO, Ceph, SeaweedFS, …) gets path-style URLs, which need no wildcard
            # DNS, and checksums only where the API requires them: several S3-compatible services
            # reject the CRC trailers newer botocore sends by default. Stored bytes are verified by
            # sha256 after writing anyway.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            request_checksum_calculation="when_required" if endpoint_url else "when_supported",
            response_checksum_validation="when_required" if endpoint_url else "when_supported",
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key or None, aws_secret_access_key=secret_key or None,
            region_name=region or ("us-east-1" if endpoint_url else None),
        )
        try:
            self.client = session.client("s3", endpoint_url=endpoint_url or None, config=config)
        except (BotoCoreError, ValueError) as exc:
            raise StoreError(scrub(f"S3 target {self.where()}: {exc}", self._secrets)) from None

    # --- naming and errors ---------------------------------------------------------
    def _key(self, name: str) -> str:
        return join(self.prefix, clean_name(name))

    def _folder(self, prefix: str) -> str:
        """Key prefix for a folder: 'a/b' lists 'a/b/…', never 'a/bc'."""
        p = join(self.prefix, clean_prefix(prefix))
        return p + "/" if p else ""

    def _name(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    def where(self, key: str = "") -> str:
        at = f" at {self.endpoint}" if self.endpoint else ""
        return f"s3://{self.bucket}/{key}{at}" if key else f"bucket {self.bucket}{at}"

    def fail(self, exc: BaseException, doing: str, key: str = "") -> StoreError:
        cls = StoreError
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchKey", "NotFound"):
                cls, reason = StoreNotFound, "no such object"
            else:
                reason = _CODES.get(code) or f"{code or status}: {err.get('Message', '')}".rstrip(": ")
        elif isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
            reason = "cannot connect (is the S3 service up and the endpoint right?)"
        elif isinstance(exc, ReadTimeoutError):
            reason = "the server did not answer in time"
        elif isinstance(exc, NoCredentialsError):
            reason = "no credentials configured"
        else:
            reason = str(exc) or type(exc).__name__
        return cls(scrub(f"S3 {doing} {self.where(key)}: {reason}", self._secrets))

    # --- the Store interface --------------------------------------------------------
    def open_write(self, name: str) -> S3Writer:
        return S3Writer(self, name, self._key(name))

    def open_read(self, name: str) -> BinaryIO:
        key = self._key(name)
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key, **self._version(name))
        except (BotoCoreError, ClientError) as exc:
            raise self.fail(exc, "reading", key) from None
        return S3Reader(resp["Body"], self, key)

    def size(self, name: str) -> int:
        key = self._key(name)
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=key, **self._version(name))["ContentLength"])
        except (BotoCoreError, ClientError) as exc:
            raise self.fail(exc, "looking up", key) from None

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
        except StoreNotFound:
            return False
        return True

    def delete(self, name: str) -> None:
        key = self._key(name)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)  # S3 answers 204 for a missing key too
        except (BotoCoreError, ClientError) as exc:
            raise self.fail(exc, "deleting", key) from None

    def delete_prefix(self, prefix: str, *, bypass_governance: bool = False) -> int:
        """Delete every object under the folder and abort incomplete uploads there; returns how many.

        On a versioned bucket every version and delete marker under the folder goes (a plain delete would only
        hide the objects behind a marker). Versions under an object lock stay: StoreLocked says until when."""
        if not clean_prefix(prefix):
            raise StoreError("refusing to delete the whole store: delete_prefix needs a folder")
        folder = self._folder(prefix)
        if self.versioned():
            return s3lock.delete_versions(self, folder, bypass_governance=bypass_governance)
        count = 0
        try:
            batch: list[dict] = []
            for key in self._keys(folder):
                batch.append({"Key": key})
                if len(batch) == 1000:  # DeleteObjects takes at most 1,000 keys
                    count += self._delete_batch(batch)
                    batch = []
            if batch:
                count += self._delete_batch(batch)
            # A worker killed mid-upload leaves an incomplete multipart upload: invisible, billed.
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                    Prefix=folder):
                for up in page.get("Uploads", []):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    count += 1
        except (BotoCoreError, ClientError) as exc:
            raise self.fail(exc, "deleting", folder) from None
        return count

    def _delete_batch(self, batch: list[dict]) -> int:
        resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        errors = resp.get("Errors") or []
        if errors:
            first = errors[0]
            raise StoreError(scrub(f"S3 deleting {self.where(first.get('Key', ''))}: {first.get('Code')}: "
                                   f"{first.get('Message', '')} ({len(errors)} object(s) not deleted)", self._secrets))
        return len(batch)

    def _keys(self, folder: str):
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"]

    def list(self, prefix: str = "") -> list[str]:
        folder = self._folder(prefix)
        try:
            return sorted(self._name(k) for k in self._keys(folder))
        except (BotoCoreError, ClientError) as exc:
            raise self.fail(exc, "listing", folder) from None

    def location(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{join(self.prefix, clean_prefix(prefix))}"

    def download_url(self, name: str, expires: int) -> str | None:
        key = self._key(name)
        try:
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key, **self._version(name)}, ExpiresIn=int(expires))
        except (BotoCoreError, ClientError) as exc:
            raise self.fail(exc, "signing a download link for", key) from None

    def check(self) -> str:
        s3lock.check_bucket(self)
        if self.lock_mode:
            return s3lock.probe_unlocked(self)
        return probe(self, f"S3 {self.where(self.prefix)}")

    # --- versions and object locks (engines/stores/s3lock.py) ---------------------------------
    def check_bucket(self) -> None:
        """Without writing anything: the bucket exists and, on a locked target, has Object Lock and versioning."""
        s3lock.check_bucket(self)

    def lock_args(self) -> dict:
        return s3lock.lock_args(self)

    def record_written(self, name: str, version_id: str) -> None:
        if version_id:
            with self._written_lock:  # the backup's lanes commit from several threads
                self.written[name] = version_id
                self.pins[name] = version_id  # what this store wrote is what it reads back (checksums, replicas)

    def _version(self, name: str) -> dict:
        version = self.pins.get(name)
        return {"VersionId": version} if version else {}

    def versioned(self) -> bool:
        if self._versioned is None:
            self._versioned = s3lock.bucket_versioned(self)
        return self._versioned

    def retention(self, name: str, version: str | None = None):
        return s3lock.retention(self, name, version or self.pins.get(name))

    def extend_retention(self, name: str, version: str | None, until):
        return s3lock.extend_retention(self, name, version or self.pins.get(name), until)

    def first_versions(self, prefix: str = "") -> dict[str, str]:
        return s3lock.first_versions(self, self._folder(prefix))


def _without_userinfo(url: str) -> str:
    """An endpoint URL for messages: never user:password@ even if someone put it there."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
