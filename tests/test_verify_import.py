"""Verification drills, the catalogue rebuilt from storage, S3 round trips and a PostgreSQL 15 → 18 clone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from django.conf import settings
from django.core import mail

from backups.models import Backup, BackupArtifact
from backups.recovery import fleet
from tests.restore_helpers import (
    command_json,
    my_drop_side_databases,
    my_grant_side_databases,
    pg_exec,
    pg_state,
    sqlite_state,
    tree_state,
)
from tests.test_backups import _backup_json, full_customer  # noqa: F401 (fixture)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def verifiable(full_customer, mysql_database):  # noqa: F811
    # A drill of a MariaDB dump restores into `<db>__kasa_verify_<tag>` on the customer's own server: the same
    # grant a restore needs.
    my_grant_side_databases(mysql_database)
    yield full_customer
    my_drop_side_databases(mysql_database)


def test_verify_drill_restores_every_part_and_records_it(verifiable):
    doc = _backup_json(verifiable.domain)
    code, run = command_json("verify", str(doc["id"]))
    assert code == 0, run
    checks = {c["artifact"]: c for c in run["result"]["checks"]}
    assert checks["db-main.pgdump.zst.enc"]["rows"] == 1234
    assert checks["db-shop.sql.zst.enc"]["rows"] == 321
    assert checks["db-cache.sqlite3.zst.enc"]["rows"] == 77
    assert checks["backend.tar.zst.enc"]["files"] >= 4
    bk = Backup.objects.get(pk=doc["id"])
    assert bk.verify_status == "passed" and bk.verified_at is not None
    r = {x.customer.pk: x for x in fleet()}[verifiable.pk]
    assert not r.never_verified and not r.outside_rpo and r.rto_measured is not None


def test_mariadb_backup_taken_while_the_app_writes_still_verifies(verifiable, mysql_database):
    """MariaDB cannot share the dump's snapshot with a second connection: rows counted by a separate query
    would differ from the dump while the app inserts, and the drill (and a restore) would refuse a good
    backup. Kasa counts the rows in the dump itself."""
    import subprocess
    import time

    from tests.conftest import MY_ADMIN, MY_HOST, MY_PORT

    m = mysql_database
    writer = subprocess.Popen(  # the "app": one autocommitted insert every millisecond or so, for ~10 s
        ["mariadb", "--protocol=TCP", "-h", MY_HOST, "-P", str(MY_PORT), "-u", MY_ADMIN, m["name"], "-e",
         "DELIMITER //\nBEGIN NOT ATOMIC DECLARE i INT DEFAULT 0; WHILE i < 8000 DO "
         "INSERT INTO carts (v) VALUES ('w'); SET i = i + 1; DO SLEEP(0.001); END WHILE; END//"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while _mysql_count(m, "carts") < 321 + 20:  # writing has begun
            assert writer.poll() is None and time.monotonic() < deadline, writer.stderr.read()
            time.sleep(0.05)
        doc = _backup_json(verifiable.domain)
        still_writing = writer.poll() is None
    finally:
        writer.kill()
        writer.wait()
    assert doc["status"] == "succeeded" and still_writing
    art = BackupArtifact.objects.get(backup_id=doc["id"], name="db-shop.sql.zst.enc")
    assert art.details["row_counts"]["carts"] > 321 + 20
    code, run = command_json("verify", str(doc["id"]))
    assert code == 0, run
    assert Backup.objects.get(pk=doc["id"]).verify_status == "passed"


def _mysql_count(m: dict, table: str) -> int:
    import subprocess

    from tests.conftest import MY_ADMIN, MY_HOST, MY_PORT

    out = subprocess.run(["mariadb", "--protocol=TCP", "-h", MY_HOST, "-P", str(MY_PORT), "-u", MY_ADMIN, "-N",
                          "-B", m["name"], "-e", f"SELECT COUNT(*) FROM `{table}`"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def test_a_drill_that_finds_a_difference_flags_the_backup_and_alerts(verifiable, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    from backups.services import global_policy

    policy = global_policy()
    policy.notify_emails = "ops@example.com"
    policy.save()
    doc = _backup_json(verifiable.domain)
    art = BackupArtifact.objects.get(backup_id=doc["id"], name="db-main.pgdump.zst.enc")
    art.details["row_counts"]["public.orders"] = 9999  # the manifest says something the dump does not hold
    art.save()
    code, run = command_json("verify", str(doc["id"]))
    assert code == 1 and "public.orders" in run["error"]
    bk = Backup.objects.get(pk=doc["id"])
    assert bk.verify_status == "failed" and bk.verified_at is None and "public.orders" in bk.verify_error
    assert any("VERIFICATION FAILED" in m.subject for m in mail.outbox)
    assert {x.customer.pk: x for x in fleet()}[verifiable.pk].never_verified


def test_verify_refuses_a_tampered_archive(verifiable):
    doc = _backup_json(verifiable.domain)
    path = Path(doc["location"]) / "admin.tar.zst.enc"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40
    path.write_bytes(bytes(data))
    code, run = command_json("verify", str(doc["id"]))
    assert code == 1 and "admin.tar.zst.enc" in run["error"]
    assert Backup.objects.get(pk=doc["id"]).verify_status == "failed"


def _own_target(tmp_path):
    """A storage target of this test alone: the default one holds every other test's backups."""
    from backups.models import StorageTarget

    return StorageTarget.objects.create(name="dr", kind="local", path=str(tmp_path / "dr"))


def test_backup_import_rebuilds_the_catalogue_from_storage(make_customer, customer_root, tmp_path):
    (customer_root / "backend" / "src").mkdir(parents=True)
    (customer_root / "backend" / "src" / "a.txt").write_text("hello\n")
    customer = make_customer(services=("backend",))
    _own_target(tmp_path)
    first = _backup_json(customer.domain, "--target", "dr")
    second = _backup_json(customer.domain, "--scope", "files", "--target", "dr")
    before = tree_state(customer_root)
    # A fresh install: the catalogue and the customer are gone; the storage, its target and the keys are not.
    from customers.models import Customer
    from operations.models import Run

    domain = customer.domain
    Backup.objects.all().delete()
    Run.objects.all().delete()
    Customer.objects.filter(pk=customer.pk).delete()
    code, doc = command_json("backup_import", "--target", "dr")
    assert code == 0, doc
    assert doc["customers_created"] == [domain]
    assert sorted(i["prefix"].rsplit("-", 1)[1] for i in doc["imported"]) == sorted([str(first["id"]),
                                                                                     str(second["id"])])
    customer = Customer.objects.get(domain=domain)
    assert customer.root == str(customer_root) and list(customer.services.values_list("name", flat=True)) == [
        "backend"]
    imported = Backup.objects.filter(customer=customer, trigger="import").order_by("finished_at")
    assert imported.count() == 2 and all(b.artifacts.exists() for b in imported)
    again = command_json("backup_import", "--target", "dr")[1]
    assert again["imported"] == [] and again["already_known"] == 2
    (customer_root / "backend" / "src" / "a.txt").write_text("changed\n")
    code, run = command_json("restore", str(imported.last().pk), "--yes", "--no-safety-backup")
    assert code == 0, run
    assert tree_state(customer_root) == before


def test_backup_import_reports_an_incomplete_backup(make_customer, customer_root, tmp_path):
    customer = make_customer(services=("backend",))
    _own_target(tmp_path)
    doc = _backup_json(customer.domain, "--target", "dr")
    Backup.objects.all().delete()
    (Path(doc["location"]) / "backend.tar.zst.enc").unlink()
    code, out = command_json("backup_import", "--target", "dr")
    assert code == 1 and "backend.tar.zst.enc is missing" in out["problems"][0]
    assert not Backup.objects.exists(), list(Backup.objects.values("id", "prefix", "status", "trigger"))


def test_round_trip_through_s3(make_customer, customer_root, s3_server):
    from backups.models import StorageTarget

    (customer_root / "backend" / "src").mkdir(parents=True)
    (customer_root / "backend" / "src" / "big.bin").write_bytes(b"\x01" * 3_000_000)
    (customer_root / "backend" / "empty").mkdir()
    customer = make_customer(services=("backend",))
    StorageTarget.objects.create(name="s3", kind="s3", bucket=s3_server.bucket, endpoint_url=s3_server.endpoint,
                                 region="us-east-1", access_key=s3_server.access_key,
                                 secret_key=s3_server.secret_key)
    doc = _backup_json(customer.domain, "--target", "s3")
    before = tree_state(customer_root)
    shutil.rmtree(customer_root / "backend" / "src")
    code, run = command_json("restore", str(doc["id"]), "--yes", "--no-safety-backup")
    assert code == 0, run
    assert tree_state(customer_root) == before


def test_postgresql_15_backup_clones_into_postgresql_18(full_customer, pg_database, mysql_database):  # noqa: F811
    from engines.scratchdb import ScratchPostgres

    my_grant_side_databases(mysql_database)
    doc = _backup_json(full_customer.domain)
    before = pg_state(pg_database)
    copy_root = Path(settings.KASA_CUSTOMERS_ROOT) / f"clone-{doc['id']}"
    (full_customer.root_path() / "backend" / ".env").write_text(
        f"API_SECRET=x\nDATABASE_URL={pg_database['url']}\nDB_NAME={pg_database['name']}\n")
    doc = _backup_json(full_customer.domain)
    try:
        with ScratchPostgres() as pg18:
            url = f"postgresql://{pg18.user}:{pg18.password}@{pg18.host}:{pg18.port}/shopcopy"
            code, run = command_json("restore", str(doc["id"]), "--to-root", str(copy_root),
                                     "--to-database", f"main={url}", "--rewrite-env", "--yes")
            assert code == 0, run
            assert pg18.password not in str(run)
            import psycopg

            with psycopg.connect(host=pg18.host, port=pg18.port, user=pg18.user, password=pg18.password,
                                 dbname="shopcopy") as con:
                version = con.execute("SHOW server_version_num").fetchone()[0]
                orders = con.execute("SELECT * FROM orders ORDER BY 1").fetchall()
            assert int(version) >= 180000
            assert orders == before["public.orders"]
            env = (copy_root / "backend" / ".env").read_text()
            assert "/shopcopy" in env and "DB_NAME=shopcopy" in env
        assert sqlite_state(copy_root / "store" / "cache.sqlite3") == sqlite_state(
            full_customer.root_path() / "store" / "cache.sqlite3")
        assert pg_state(pg_database) == before  # the source was never touched
    finally:
        shutil.rmtree(copy_root, ignore_errors=True)
        pg_exec(pg_database, "SELECT 1")
