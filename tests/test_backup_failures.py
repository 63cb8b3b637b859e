"""Every injected failure ends with the backup failed and nothing restorable left behind."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from backups.models import Backup, BackupPolicy, StorageTarget
from backups.services import backup_start, default_target, global_policy
from operations.models import Run
from operations.services import runs_reap
from tests.conftest import free_port, mysql_admin, require, wait_dead, wait_until

MiB = 1 << 20


def _files(root: Path, mib: int = 8) -> None:
    (root / "backend").mkdir(exist_ok=True)
    block = os.urandom(MiB)
    with open(root / "backend" / "media.bin", "wb") as fh:
        for i in range(mib):
            fh.write(block[i:] + block[:i])  # incompressible, not repetitive at zstd's window


def _leftovers(target: StorageTarget, prefix: str) -> list[str]:
    folder = Path(target.path) / prefix
    return [str(p) for p in folder.rglob("*")] if folder.exists() else []


def _backup_fails(domain, *args) -> Backup:
    with pytest.raises(CommandError) as err:
        call_command("backup", domain, *args)
    assert err.value.returncode == 1
    return Backup.objects.filter(customer__domain=domain).latest("id")


@pytest.mark.django_db(transaction=True)
def test_dump_exit_nonzero_fails_the_backup_and_removes_earlier_artifacts(make_customer, customer_root,
                                                                           mysql_database):
    m = mysql_database
    _files(customer_root, 2)
    # A view over a dropped table: the row counts (base tables only) work, mariadb-dump exits non-zero.
    mysql_admin(f"CREATE TABLE `{m['name']}`.t (x INT); CREATE VIEW `{m['name']}`.v AS SELECT x FROM `{m['name']}`.t;"
                f" DROP TABLE `{m['name']}`.t;")
    from urllib.parse import quote

    url = f"mysql://{m['user']}:{quote(m['password'], safe='')}@{m['host']}:{m['port']}/{m['name']}"
    customer = make_customer(databases=[("main", url)])
    bk = _backup_fails(customer.domain)
    assert bk.status == "failed" and "mariadb-dump failed" in bk.error
    assert _leftovers(bk.target, bk.prefix) == []  # backend.tar.zst.enc was written first, then removed
    run = Run.objects.get(backup=bk)
    assert run.status == "failed" and run.log_lines.filter(text__contains="removed").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    require(ok.returncode == 0, "permission to mount a tmpfs (root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
def test_full_disk_fails_the_backup_and_leaves_no_partial_file(make_customer, customer_root, tiny_disk):
    _files(customer_root, 8)
    StorageTarget.objects.create(name="tiny", kind="local", path=str(tiny_disk))
    customer = make_customer()
    bk = _backup_fails(customer.domain, "--target", "tiny", "--compression", "none")
    assert bk.status == "failed" and "disk full" in bk.error
    assert [p for p in tiny_disk.rglob("*") if p.is_file()] == []
    assert shutil.disk_usage(tiny_disk).used < 64 * 1024


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
def test_unreachable_s3_fails_quickly_with_a_clear_message(make_customer, customer_root):
    _files(customer_root, 1)
    StorageTarget.objects.create(name="s3-down", kind="s3", bucket="kasa-backups",
                                 endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1",
                                 access_key="AKIAEXAMPLE", secret_key="Sup3r-S3cret-Key")
    customer = make_customer()
    bk = _backup_fails(customer.domain, "--target", "s3-down")
    assert bk.status == "failed" and "cannot connect" in bk.error and "kasa-backups" in bk.error
    assert "Sup3r-S3cret-Key" not in bk.error
    run = Run.objects.get(backup=bk)
    assert not run.log_lines.filter(text__contains="Sup3r-S3cret-Key").exists()


def _s3_target(s3, name="s3") -> StorageTarget:
    return StorageTarget.objects.create(name=name, kind="s3", bucket=s3.bucket, endpoint_url=s3.endpoint,
                                        region=s3.region, access_key=s3.access_key, secret_key=s3.secret_key)


@pytest.mark.django_db(transaction=True)
def test_backup_to_s3_stores_checksummed_objects_and_leaves_no_open_upload(make_customer, customer_root, s3_server):
    import hashlib

    _files(customer_root, 12)  # several multipart parts
    _s3_target(s3_server)
    customer = make_customer()
    out = io.StringIO()
    call_command("backup", customer.domain, "--target", "s3", "--json", stdout=out)
    doc = json.loads(out.getvalue())
    assert doc["location"].startswith(f"s3://{s3_server.bucket}/") and doc["status"] == "succeeded"
    client = s3_server.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_server.bucket)["Contents"]}
    prefix = Backup.objects.get(pk=doc["id"]).prefix
    sidecars = {f"{prefix}/{a['index']['name']}" for a in doc["artifacts"] if "index" in a}  # file indexes
    assert sidecars == {f"{prefix}/backend.index.gz.enc"}
    assert keys == {f"{prefix}/{a['name']}" for a in doc["artifacts"]} | sidecars | {f"{prefix}/backup.json"}
    for art in doc["artifacts"]:
        body = client.get_object(Bucket=s3_server.bucket, Key=f"{prefix}/{art['name']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == art["sha256"]
    assert not client.list_multipart_uploads(Bucket=s3_server.bucket).get("Uploads")


@pytest.mark.django_db(transaction=True)
def test_replica_gets_a_verified_copy_of_every_object(make_customer, customer_root, s3_server):
    _files(customer_root, 2)
    policy = global_policy()
    policy.replicas.add(_s3_target(s3_server, "offsite"))
    customer = make_customer()
    run = backup_start(customer, via="cli", enqueue=False)
    from operations.services import run_execute

    assert run_execute(run.pk) == "succeeded"
    bk = Backup.objects.get(run=run)
    copy = bk.copies.get()
    assert copy.target.name == "offsite" and copy.verified_at is not None
    local = sorted(p.name for p in (Path(bk.target.path) / bk.prefix).iterdir())
    remote = sorted(k.rsplit("/", 1)[1] for k in copy.target.store().list(bk.prefix))
    assert local == remote and "backup.json" in remote


@pytest.mark.django_db(transaction=True)
def test_worker_killed_mid_backup_leaves_no_partial_artifacts(make_customer, customer_root, start_worker):
    _files(customer_root, 40)
    policy = global_policy()
    policy.bandwidth_limit_mbps = 2  # ~20 s of upload: time to kill the worker mid-stream
    policy.compression = BackupPolicy.Compression.NONE
    policy.save()
    customer = make_customer()
    worker = start_worker()
    run = backup_start(customer, via="cli")
    wait_until(lambda: Run.objects.filter(pk=run.pk, status="running", progress_done__gt=2 * MiB).exists(), 60,
               what="the backup to stream")
    bk = Backup.objects.get(run=run)
    folder = Path(default_target().path) / bk.prefix
    assert any(folder.iterdir())  # a temp file is being written
    pid = int(Run.objects.get(pk=run.pk).worker.rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    wait_dead(pid)
    assert run.pk in runs_reap()
    bk.refresh_from_db()
    assert bk.status == "failed"
    assert _leftovers(bk.target, bk.prefix) == [], worker.output()[-2000:]
    assert Run.objects.get(pk=run.pk).status == "failed"


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
def test_retention_keeps_exactly_what_the_policy_says(make_customer, customer_root):
    (customer_root / ".env").write_text("A=1\n")
    policy = global_policy()
    policy.keep_last = 3
    policy.save()
    customer = make_customer()
    ids = []
    for _ in range(5):
        out = io.StringIO()
        call_command("backup", customer.domain, "--scope", "config", "--json", stdout=out)
        ids.append(json.loads(out.getvalue())["id"])
    # Retention ran after each success: the newest 3 remain, the 2 oldest are gone from storage too.
    succeeded = set(Backup.objects.filter(customer=customer, status="succeeded").values_list("id", flat=True))
    assert succeeded == set(ids[-3:])
    for old in ids[:2]:
        bk = Backup.objects.get(pk=old)
        assert bk.status == "deleted" and not (Path(default_target().path) / bk.prefix).exists()

    Backup.objects.filter(pk=ids[-3]).update(pinned=True)
    policy.keep_last = 1
    policy.save()
    out = io.StringIO()
    call_command("prune", customer.domain, "--dry-run", "--json", stdout=out)
    plan = json.loads(out.getvalue())[0]
    assert plan["delete"] == [ids[-2]] and plan["dry_run"]  # the pinned one and the newest stay
    assert Backup.objects.filter(pk=ids[-2], status="succeeded").exists()  # a dry run deletes nothing
    call_command("prune", customer.domain, "--json", stdout=io.StringIO())
    assert set(Backup.objects.filter(customer=customer, status="succeeded").values_list("id", flat=True)) == {
        ids[-3], ids[-1]}
    assert not (Path(default_target().path) / Backup.objects.get(pk=ids[-2]).prefix).exists()


@pytest.mark.django_db(transaction=True)
def test_backup_of_a_2_gb_input_keeps_memory_flat(make_customer, customer_root, subprocess_env):
    """Peak RSS of the whole backup process tree stays under 200 MB for 2 GB of data."""
    block = os.urandom(8 * MiB)
    (customer_root / "backend").mkdir(exist_ok=True)
    with open(customer_root / "backend" / "big.bin", "wb") as fh:
        for _ in range(256):
            fh.write(block)
    customer = make_customer()
    launcher = ("import resource, subprocess, sys\n"
                "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode\n"
                "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", launcher, sys.executable, "manage.py", "backup", customer.domain,
                          "--scope", "files", "--compression", "none"],
                         env=subprocess_env, capture_output=True, text=True, timeout=600)
    rc, peak_kib = map(int, out.stdout.split())
    assert rc == 0, out.stderr
    bk = Backup.objects.get(customer=customer)
    assert bk.status == "succeeded" and bk.size > 2 * 1024 * MiB
    assert peak_kib < 200 * 1024, f"peak RSS {peak_kib / 1024:.0f} MB"
    shutil.rmtree(Path(bk.target.path) / bk.prefix)


@pytest.mark.django_db(transaction=True)
def test_an_unreachable_replica_keeps_the_primary_backup_and_records_the_failed_copy(make_customer, customer_root,
                                                                                      settings, mailoutbox):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    _files(customer_root, 1)
    policy = global_policy()
    policy.notify_emails = "ops@example.com"  # notify_on_success stays off: a lost replica is alerted anyway
    policy.replicas.add(StorageTarget.objects.create(
        name="offsite-down", kind="s3", bucket="offsite", region="us-east-1",
        endpoint_url=f"http://127.0.0.1:{free_port()}", access_key="AKIA", secret_key="Replica-Secret-9"))
    policy.save()
    customer = make_customer()
    out = io.StringIO()
    call_command("backup", customer.domain, "--json", stdout=out)
    doc = json.loads(out.getvalue())
    bk = Backup.objects.get(pk=doc["id"])
    assert bk.status == "succeeded" and (Path(bk.target.path) / bk.prefix / "backup.json").exists()
    copy = bk.copies.get()
    assert copy.status == "failed" and "cannot connect" in copy.error and "Replica-Secret-9" not in copy.error
    run = Run.objects.get(backup=bk)
    assert run.log_lines.filter(level="warning", text__contains="replica offsite-down failed").exists()
    assert len(mailoutbox) == 1 and "REPLICA FAILED" in mailoutbox[0].subject
    assert "offsite-down failed" in mailoutbox[0].body and "Replica-Secret-9" not in mailoutbox[0].body


@pytest.mark.smoke
@pytest.mark.django_db(transaction=True)
def test_a_root_that_now_escapes_fails_the_backup_with_a_clear_message(make_customer, customer_root, tmp_path):
    customer = make_customer()
    import shutil as _shutil

    _shutil.rmtree(customer_root)
    customer_root.symlink_to(tmp_path)  # the folder was swapped for a link out of KASA_CUSTOMERS_ROOT
    with pytest.raises(CommandError) as err:
        call_command("backup", customer.domain)
    assert err.value.returncode == 1
    # Refused by the check every mutating run passes before its handler: no backup was even begun.
    run = Run.objects.get(customer=customer, kind="backup")
    assert run.status == "failed" and run.error.startswith("refused before touching anything"), run.error
    assert "outside" in run.error
    assert not Backup.objects.filter(customer=customer).exists()
    customer_root.unlink()
    customer_root.mkdir()
