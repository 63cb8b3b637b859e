"""Storage targets in the admin: superusers only, credentials write-only, a working "check target"."""

import pytest
from django.db import connection

from backups.models import StorageTarget
from backups.services import default_target
from tests.conftest import free_port

pytestmark = pytest.mark.django_db


@pytest.mark.smoke
def test_default_local_target_exists_and_checks(client, admin_user):
    target = default_target()
    assert target.name == "local" and target.kind == "local"
    client.force_login(admin_user)
    response = client.post("/backups/storagetarget/", {"action": "check_target", "_selected_action": [target.pk]},
                           follow=True)
    levels = {m.level_tag: str(m) for m in response.context["messages"]}
    assert "error" not in levels and levels["success"].startswith("local: ")


def test_check_target_reports_an_unreachable_s3_without_its_secret(client, admin_user):
    target = StorageTarget.objects.create(name="offsite", kind="s3", bucket="b1", region="us-east-1",
                                          endpoint_url=f"http://127.0.0.1:{free_port()}",
                                          access_key="AKIAKASA", secret_key="Very-Secret-S3-Key")
    client.force_login(admin_user)
    response = client.post("/backups/storagetarget/", {"action": "check_target", "_selected_action": [target.pk]},
                           follow=True)
    errors = [str(m) for m in response.context["messages"] if m.level_tag == "error"]
    assert errors and "offsite" in errors[0] and "cannot connect" in errors[0]
    html = response.content.decode() + client.get(f"/backups/storagetarget/{target.pk}/change/").content.decode()
    assert "Very-Secret-S3-Key" not in html


@pytest.mark.smoke
def test_target_credentials_are_encrypted_at_rest():
    target = StorageTarget.objects.create(name="s3", kind="s3", bucket="b", secret_key="Very-Secret-S3-Key")
    with connection.cursor() as cur:
        cur.execute("SELECT secret_key FROM backups_storagetarget WHERE id = %s", [target.pk])
        raw = cur.fetchone()[0]
    assert "Very-Secret" not in raw and StorageTarget.objects.get(pk=target.pk).secret_key.reveal() == \
        "Very-Secret-S3-Key"


@pytest.mark.smoke
def test_staff_cannot_see_or_change_storage_targets(client, staff_user, team):
    default_target()
    client.force_login(staff_user(team))
    assert client.get("/backups/storagetarget/").status_code == 403
    assert "Storage targets" not in client.get("/").content.decode()


@pytest.mark.django_db(transaction=True)
def test_backup_to_an_sftp_target_with_a_pinned_host_key(make_customer, customer_root, sshd, tmp_path):
    """End to end through a StorageTarget: artifacts land on a real OpenSSH server, checksums match."""
    import hashlib
    import io
    import json

    from django.core.management import call_command

    (customer_root / "backend" / "data.bin").parent.mkdir(parents=True, exist_ok=True)
    (customer_root / "backend" / "data.bin").write_bytes(b"kasa" * 300_000)
    remote = tmp_path / "sftp-backups"
    remote.mkdir()
    StorageTarget.objects.create(name="vault", kind="sftp", host=sshd["host"], port=sshd["port"],
                                 username=sshd["username"], path=str(remote), private_key=sshd["private_key"],
                                 host_key=sshd["host_key"])
    customer = make_customer()
    out = io.StringIO()
    call_command("backup", customer.domain, "--target", "vault", "--json", stdout=out)
    doc = json.loads(out.getvalue())
    assert doc["status"] == "succeeded" and doc["location"].startswith("sftp://")
    folder = next(remote.glob(f"{customer.domain}/*"))
    for art in doc["artifacts"]:
        assert hashlib.sha256((folder / art["name"]).read_bytes()).hexdigest() == art["sha256"]
    assert (folder / "backup.json").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left
