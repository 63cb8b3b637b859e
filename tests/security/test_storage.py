"""Storage is untrusted input (issue 11, point 4): whoever can write to a storage target cannot make
`backup_import` create, attach or trust anything Kasa did not write, and an imported customer never brings
commands with it.

The forger can write any file on the target but does not hold KASA_BACKUP_KEYS, so a manifest it changed carries
no valid tag: it drops the tag. Each attack is tried as is (refused: the manifest is not signed) and again with
`--trust-unsigned`, as an operator importing old backups would run it (refused all the same, by the field
validation). Real backups on the local target, the real commands.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from backups.models import Backup, StorageTarget
from customers.models import Customer, Service
from operations.models import Run
from tests.restore_helpers import command_json
from tests.test_backups import _backup_json

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def dr(tmp_path):
    """A storage target of this test alone (the default one holds every other test's backups)."""
    return StorageTarget.objects.create(name="dr", kind="local", path=str(tmp_path / "dr"))


@pytest.fixture
def stored(make_customer, customer_root, dr):
    """A real backup of a real customer on the target: (customer, its backup folder)."""
    (customer_root / "backend" / "src").mkdir(parents=True)
    (customer_root / "backend" / "src" / "app.js").write_text("console.log('shop')\n")
    (customer_root / "backend" / ".env").write_text("API_SECRET=shop-secret\n")
    customer = make_customer(services=("backend",))
    doc = _backup_json(customer.domain, "--scope", "files", "--target", "dr")
    return customer, Path(doc["location"])


def fresh_install(*customers) -> None:
    """Kasa's control database is gone (the catalogue and these customers); storage, targets and keys are not."""
    Backup.objects.all().delete()
    Run.objects.all().delete()
    Customer.objects.filter(pk__in=[c.pk for c in customers]).delete()


def forge(folder: Path, change) -> dict:
    """Rewrite a backup's manifest as a forger would: changed, and without the tag it can no longer compute."""
    manifest = json.loads((folder / "backup.json").read_text())
    change(manifest)
    manifest.pop("auth", None)
    (folder / "backup.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def import_refused(folder: Path, *flags) -> str:
    """backup_import exits 2, names the backup folder, and imports nothing at all."""
    customers_before = set(Customer.objects.values_list("pk", flat=True))
    backups_before = Backup.objects.count()
    code, doc = command_json("backup_import", "--target", "dr", *flags)
    assert code == 2, doc
    assert doc["imported"] == [] and doc["customers_created"] == [], doc
    refusal = " ".join(doc["refused"])
    assert f"{folder.parent.name}/{folder.name}" in refusal, refusal
    assert set(Customer.objects.values_list("pk", flat=True)) == customers_before
    assert Backup.objects.count() == backups_before
    return refusal


def test_backup_import_never_creates_a_customer_rooted_at_etc(stored):
    customer, folder = stored
    fresh_install(customer)
    forge(folder, lambda m: m["instance"].update(root="/etc"))
    assert "not signed" in import_refused(folder)
    assert "/etc" in import_refused(folder, "--trust-unsigned")
    assert not Customer.objects.filter(root="/etc").exists()


def test_backup_import_never_creates_a_service_path_that_climbs_out_of_the_root(stored):
    customer, folder = stored
    fresh_install(customer)
    forge(folder, lambda m: m["instance"]["services"][0].update(path="../../.."))
    assert "not signed" in import_refused(folder)
    assert "'../../..' contains '..'" in import_refused(folder, "--trust-unsigned")
    assert not Service.objects.filter(path__contains="..").exists()


def _kasa_database() -> str:
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return str(db["NAME"])
    return str(settings.KASA_VAR_DIR / "kasa.sqlite3")  # where the default control database lives


def test_backup_import_never_points_a_sqlite_database_at_kasas_own_database(stored):
    customer, folder = stored
    fresh_install(customer)
    kasa_db = _kasa_database()
    forge(folder, lambda m: m["instance"].update(databases=[
        {"name": "main", "engine": "sqlite", "host": "", "port": None, "database": "", "user": "",
         "sqlite_path": kasa_db}]))
    assert "not signed" in import_refused(folder)
    assert "SQLite path" in import_refused(folder, "--trust-unsigned")
    from customers.models import DatabaseConnection

    assert not DatabaseConnection.objects.filter(sqlite_path=kasa_db).exists()


def test_a_forged_backup_never_attaches_to_another_teams_customer(stored, make_customer):
    """The forger copies its own backup folder under the domain of another team's customer."""
    from customers.models import Team

    attacker, folder = stored
    victim = make_customer(f"victim-{uuid.uuid4().hex[:6]}.example.com", services=("backend",),
                           team_=Team.objects.create(name=f"victims-{uuid.uuid4().hex[:6]}"))
    Backup.objects.filter(customer=attacker).delete()  # the attacker's own catalogue rows: only storage matters

    def to_victim(m):
        m["customer"] = {"domain": victim.domain, "name": victim.name}  # no UUID, as a pre-UUID manifest
    forge(folder, to_victim)
    assert "not signed" in import_refused(folder)
    assert "UUID" in import_refused(folder, "--trust-unsigned")

    def with_another_uuid(m):
        m["customer"]["uuid"] = str(uuid.uuid4())
    forge(folder, with_another_uuid)
    assert "another customer" in import_refused(folder, "--trust-unsigned")
    assert not Backup.objects.filter(customer=victim).exists()


def test_a_forged_plaintext_backup_is_never_trusted_where_the_policy_encrypts(make_customer, customer_root, dr):
    """Plaintext artifacts are what a forger can make without the keys; the global policy encrypts."""
    (customer_root / "backend").mkdir(exist_ok=True)
    (customer_root / "backend" / "index.php").write_text("<?php /* the forger's code */\n")
    customer = make_customer(services=("backend",))
    doc = _backup_json(customer.domain, "--scope", "files", "--target", "dr", "--no-encrypt")
    folder = Path(doc["location"])
    fresh_install(customer)
    forge(folder, lambda m: None)  # the forger's own plaintext backup, with a manifest it wrote
    assert "not signed" in import_refused(folder)
    assert "not encrypted" in import_refused(folder, "--trust-unsigned")
    assert not Backup.objects.filter(encrypted=False).exists()


def test_a_restore_of_an_imported_backup_never_runs_the_manifests_commands(stored, tmp_path):
    """Even a manifest Kasa signed brings no commands: the customer it re-creates has no runtime fields, so a
    restore in place runs nothing from storage as the worker (root here)."""
    customer, folder = stored
    marker = tmp_path / "ran"
    Service.objects.filter(customer=customer).update(
        process_manager="command", app_name="backend",
        start_command=["sh", "-c", f"id -u >> {marker}"], stop_command=["sh", "-c", f"id -u >> {marker}"])
    doc = _backup_json(customer.domain, "--scope", "files", "--target", "dr", "--full")  # the manifest records them
    assert json.loads((Path(doc["location"]) / "backup.json").read_text())["instance"]["services"][0][
        "stop_command"]
    shutil.rmtree(folder)  # the one backup on storage is the one whose manifest holds the commands
    domain = customer.domain
    fresh_install(customer)
    code, imported = command_json("backup_import", "--target", "dr")
    assert code == 0 and len(imported["imported"]) == 1, imported
    svc = Service.objects.get(customer__domain=domain)
    assert (svc.process_manager, svc.start_command, svc.stop_command, svc.app_name, svc.health_url) == (
        "none", [], [], "", ""), "the imported service brought what runs"
    code, run = command_json("restore", str(imported["imported"][0]["id"]), "--yes", "--no-safety-backup")
    assert not marker.exists(), marker.read_text()
    assert code == 0, run

