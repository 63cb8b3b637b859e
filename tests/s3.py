"""A real S3 for tests: moto's HTTP server in a subprocess, reached over TCP by boto3.

One moto process serves the whole session (it starts in about a second and
keeps objects in memory); each test gets a fresh bucket, emptied and dropped
afterwards. Import both fixtures where they are used:

    from tests.s3 import moto_server, s3_server  # noqa: F401

`start_moto(log_path)` starts a private server for a test that needs to stop it
(S3 going down mid-upload).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port, port_open, require, wait_until

ACCESS_KEY = SECRET_KEY = "testing"
REGION = "us-east-1"


@dataclass
class Moto:
    endpoint: str
    popen: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def store(self, **kwargs):
        from engines.stores.s3 import S3Store

        return S3Store(self.bucket, endpoint_url=self.endpoint, region=self.region, access_key=self.access_key,
                       secret_key=self.secret_key, **kwargs)


def start_moto(log_path: Path) -> Moto:
    require(importlib.util.find_spec("moto") is not None and importlib.util.find_spec("flask") is not None,
            "moto[server] (make install)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # never a developer's real keys
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION)
    log = open(log_path, "wb")  # noqa: SIM115 (the child writes to it until stopped)
    popen = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
                             env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    moto = Moto(f"http://127.0.0.1:{port}", popen, log_path)
    try:
        wait_until(lambda: port_open("127.0.0.1", port, 0.2) or popen.poll() is not None, 30, what="moto server")
        assert popen.poll() is None, f"moto server exited:\n{moto.output()}"
    except BaseException:
        moto.stop()
        raise
    return moto


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    moto = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    yield moto
    moto.stop()


@pytest.fixture
def s3_server(moto_server):
    """Endpoint, a fresh empty bucket and the credentials ("testing"/"testing")."""
    server = S3Server(endpoint=moto_server.endpoint, bucket=f"kasa-t-{uuid.uuid4().hex[:12]}")
    client = server.client()
    client.create_bucket(Bucket=server.bucket)
    yield server
    # Free moto's memory: objects, incomplete uploads, then the bucket.
    for up in client.list_multipart_uploads(Bucket=server.bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=server.bucket, Key=up["Key"], UploadId=up["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=server.bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=server.bucket, Delete={"Objects": keys})
    client.delete_bucket(Bucket=server.bucket)
