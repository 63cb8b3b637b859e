"""backup_import trusts only what Kasa wrote: signed manifests, checked field by field, attached by customer UUID;
unsigned ones only on request and marked; and an artifact is read only as what the catalogue says it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from backups.models import Backup, StorageTarget
from customers.models import Customer
from operations.models import Run
from tests.restore_helpers import command_json
from tests.test_backups import _backup_json

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def backed_up(make_customer, customer_root, tmp_path):
    """A customer with one service, and a function taking a backup of it to the test's own target `dr`."""
    StorageTarget.objects.create(name="dr", kind="local", path=str(tmp_path / "dr"))
    (customer_root / "backend" / "src").mkdir(parents=True)
    (customer_root / "backend" / "src" / "app.js").write_text("console.log('hi')\n")
    customer = make_customer(services=("backend",))

    def backup(*args) -> Path:
        return Path(_backup_json(customer.domain, "--scope", "files", "--target", "dr", *args)["location"])

    return customer, backup


def fresh_install(customer=None) -> None:
    Backup.objects.all().delete()
    Run.objects.all().delete()
    if customer is not None:
        Customer.objects.filter(pk=customer.pk).delete()


def as_before_signing(folder: Path) -> None:
    """The manifest as a Kasa before this change wrote it: no tag, no customer UUID."""
    manifest = json.loads((folder / "backup.json").read_text())
    manifest.pop("auth")
    manifest["customer"].pop("uuid")
    (folder / "backup.json").write_text(json.dumps(manifest, indent=2))


def test_an_unsigned_manifest_is_imported_only_when_trusted_and_is_marked_unsigned(backed_up, client, admin_user):
    customer, backup = backed_up
    folder = backup()
    as_before_signing(folder)
    fresh_install(customer)
    code, doc = command_json("backup_import", "--target", "dr")
    assert code == 2 and "--trust-unsigned" in doc["refused"][0] and str(folder) in doc["refused"][0], doc
    assert not Customer.objects.exists() and not Backup.objects.exists()
    code, doc = command_json("backup_import", "--target", "dr", "--trust-unsigned")
    assert code == 0 and doc["imported"][0]["unsigned"] is True, doc
    bk = Backup.objects.get()
    assert bk.unsigned and bk.customer.domain == customer.domain
    client.force_login(admin_user)
    page = client.get(f"/backups/backup/{bk.pk}/change/").content.decode()
    assert "Unsigned" in page and "--trust-unsigned" in page  # the field and its help text
    assert "column-unsigned" in client.get("/backups/backup/").content.decode()


def test_a_signed_backup_is_imported_as_signed(backed_up):
    customer, backup = backed_up
    backup()
    fresh_install(customer)
    code, doc = command_json("backup_import", "--target", "dr", "--trust-unsigned")
    assert code == 0 and doc["imported"][0]["unsigned"] is False, doc
    assert Customer.objects.get(domain=customer.domain).uuid == customer.uuid  # re-created as itself


def test_a_tag_that_does_not_match_is_refused_even_when_trusting_unsigned(backed_up):
    customer, backup = backed_up
    folder = backup()
    manifest = json.loads((folder / "backup.json").read_text())
    manifest["scope"] = "full"
    (folder / "backup.json").write_text(json.dumps(manifest))
    fresh_install(customer)
    code, doc = command_json("backup_import", "--target", "dr", "--trust-unsigned")
    assert code == 2 and "tag does not match" in doc["refused"][0], doc
    assert not Backup.objects.exists()


def test_a_manifest_signed_with_a_key_kasa_does_not_hold_is_refused(backed_up, settings):
    customer, backup = backed_up
    backup()
    fresh_install(customer)
    settings.KASA_BACKUP_KEYS = "x" * 40
    code, doc = command_json("backup_import", "--target", "dr", "--trust-unsigned")
    assert code == 2 and "which is not in KASA_BACKUP_KEYS" in doc["refused"][0], doc


def test_one_refused_manifest_imports_nothing_from_any_folder(backed_up):
    customer, backup = backed_up
    backup()
    backup()
    forged = backup()
    manifest = json.loads((forged / "backup.json").read_text())
    manifest["artifacts"][0]["name"] = "../../other.example.com/x/backend.tar.zst.enc"
    (forged / "backup.json").write_text(json.dumps(manifest))
    fresh_install(customer)
    code, doc = command_json("backup_import", "--target", "dr")
    assert code == 2 and len(doc["refused"]) == 1 and doc["imported"] == [], doc
    assert not Customer.objects.exists() and not Backup.objects.exists()


def test_even_a_signed_manifest_is_checked_field_by_field(backed_up, settings):
    """Signed with the real key (as a Kasa with a bug might): an artifact name that reaches into another
    backup's folder is refused all the same."""
    from engines import manifestauth

    customer, backup = backed_up
    folder = backup()
    manifest = json.loads((folder / "backup.json").read_text())
    manifest["artifacts"][0]["name"] = "../other/backend.tar.zst.enc"
    signed = manifestauth.sign(manifest, manifestauth.ManifestKeys(settings.KASA_BACKUP_KEYS))
    (folder / "backup.json").write_text(json.dumps(signed))
    fresh_install(customer)
    code, doc = command_json("backup_import", "--target", "dr")
    assert code == 2 and "artifacts[0].name" in doc["refused"][0], doc


def test_older_backups_of_one_customer_come_back_together(backed_up):
    """Without UUIDs, the backups of a customer that one import re-creates join it; a later import of another
    UUID-less backup does not attach to the customer that now exists."""
    customer, backup = backed_up
    first, second = backup("--full"), backup("--full")  # as a Kasa before differential backups made them
    third = backup("--full")
    for folder in (first, second, third):
        as_before_signing(folder)
    held = third.parent.parent.parent / "held-back"  # outside the target
    shutil.move(third, held)
    fresh_install(customer)
    code, doc = command_json("backup_import", "--target", "dr", "--trust-unsigned")
    assert code == 0 and doc["customers_created"] == [customer.domain] and len(doc["imported"]) == 2, doc
    assert Backup.objects.filter(customer__domain=customer.domain).count() == 2
    shutil.move(held, third)
    code, doc = command_json("backup_import", "--target", "dr", "--trust-unsigned")
    assert code == 2 and "no UUID" in doc["refused"][0], doc


def test_a_backup_comes_back_to_its_customer_by_uuid_even_after_a_rename(backed_up):
    customer, backup = backed_up
    backup()
    fresh_install()
    Customer.objects.filter(pk=customer.pk).update(domain="renamed.example.com")
    code, doc = command_json("backup_import", "--target", "dr")
    assert code == 0 and doc["customers_created"] == [], doc
    assert Backup.objects.get().customer_id == customer.pk


def test_a_plaintext_backup_is_imported_where_the_policy_does_not_encrypt(backed_up):
    from backups.services import global_policy

    customer, backup = backed_up
    backup("--no-encrypt")
    fresh_install(customer)
    code, doc = command_json("backup_import", "--target", "dr")
    assert code == 2 and "not encrypted" in doc["refused"][0], doc
    policy = global_policy()
    policy.encrypt = False
    policy.save()
    code, doc = command_json("backup_import", "--target", "dr")
    assert code == 0 and not Backup.objects.get().encrypted, doc


@pytest.mark.parametrize("encrypt", [True, False])
def test_an_artifact_is_read_only_as_what_the_catalogue_says_it_is(backed_up, encrypt):
    """A "plaintext" artifact that is really a Kasa encrypted stream, or the reverse: the drill and the restore
    both refuse it (engines.unpack checks the stream against the catalogue), and nothing is touched."""
    from tests.restore_helpers import tree_state

    customer, backup = backed_up
    backup(*([] if encrypt else ["--no-encrypt"]))
    bk = Backup.objects.get(customer=customer)
    Backup.objects.filter(pk=bk.pk).update(encrypted=not encrypt)  # what a lying manifest would have recorded
    code, run = command_json("verify", str(bk.pk))
    expected = "encrypted but the catalogue says" if encrypt else "not a Kasa encrypted backup artifact"
    assert code == 1 and expected in run["error"], run
    before = tree_state(customer.root_path())
    code, run = command_json("restore", str(bk.pk), "--yes", "--no-safety-backup")
    assert code == 1 and expected in run["error"], run
    assert tree_state(customer.root_path()) == before


def test_a_manifest_on_s3_is_checked_the_same_way(make_customer, customer_root, s3_server):
    """The forger writes to the bucket (its own credentials to it are enough); the tag is what Kasa trusts."""
    (customer_root / "backend").mkdir(exist_ok=True)
    (customer_root / "backend" / "app.js").write_text("console.log('s3')\n")
    customer = make_customer(services=("backend",))
    StorageTarget.objects.create(name="s3", kind="s3", bucket=s3_server.bucket, endpoint_url=s3_server.endpoint,
                                 region="us-east-1", access_key=s3_server.access_key,
                                 secret_key=s3_server.secret_key)
    doc = _backup_json(customer.domain, "--scope", "files", "--target", "s3")
    key = f"{Backup.objects.get(pk=doc['id']).prefix}/backup.json"
    client = s3_server.client()
    original = client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    forged = json.loads(original)
    forged["instance"]["root"] = "/etc"
    forged.pop("auth")
    client.put_object(Bucket=s3_server.bucket, Key=key, Body=json.dumps(forged).encode())
    fresh_install(customer)
    code, out = command_json("backup_import", "--target", "s3")
    assert code == 2 and "not signed" in out["refused"][0] and not Customer.objects.exists(), out
    client.put_object(Bucket=s3_server.bucket, Key=key, Body=original)
    code, out = command_json("backup_import", "--target", "s3")
    assert code == 0 and out["customers_created"] == [customer.domain], out
