"""Recovery objectives (RPO/RTO) and their gauges, drill schedules, and what a restore refuses outright."""

from __future__ import annotations

import io
import tarfile
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone
from django_q.models import Schedule

from backups.models import Backup, BackupArtifact, BackupPolicy
from backups.recovery import fleet
from backups.services import default_target
from backups.tasks import scheduled_verify
from engines.artifact import write_artifact
from engines.backupcrypto import KeyRing
from engines.streams import ProcessChain, Stage
from operations.models import Run
from tests.restore_helpers import command_json, tree_state

pytestmark = pytest.mark.django_db(transaction=True)


def _backup_row(customer, *, days_ago: float, verified: bool = False, status="succeeded", size=1000):
    finished = timezone.now() - timedelta(days=days_ago)
    return Backup.objects.create(
        customer=customer, target=default_target(), status=status, scope="full", size=size,
        started_at=finished - timedelta(seconds=5), finished_at=finished, prefix=f"{customer.domain}/x-{days_ago}",
        verify_status="passed" if verified else "never", verified_at=timezone.now() if verified else None)


@pytest.mark.smoke
def test_rpo_counts_only_verified_backups_and_targets_come_from_policy_or_settings(make_customer, settings):
    settings.KASA_RPO_HOURS = 24
    fresh_unverified, old_verified, good, failing = (make_customer() for _ in range(4))
    _backup_row(fresh_unverified, days_ago=0.01)
    _backup_row(old_verified, days_ago=3, verified=True)
    _backup_row(good, days_ago=0.5, verified=True, size=5000)
    _backup_row(failing, days_ago=0.2, verified=True)
    _backup_row(failing, days_ago=0.1, status="failed")
    BackupPolicy.objects.create(customer=old_verified, target=default_target(), rpo_hours=100)
    rows = {r.customer.domain: r for r in fleet()}
    assert rows[fresh_unverified.domain].never_verified and rows[fresh_unverified.domain].outside_rpo
    assert not rows[old_verified.domain].outside_rpo  # 72 h old, its own target is 100 h
    assert rows[good.domain].rpo_target == timedelta(hours=24) and not rows[good.domain].outside_rpo
    assert rows[good.domain].storage == 5000
    assert rows[failing.domain].last_failed


@pytest.mark.smoke
def test_metrics_expose_rpo_and_rto_per_customer(client, make_customer):
    customer = make_customer()
    _backup_row(customer, days_ago=1, verified=True)
    start = timezone.now() - timedelta(minutes=10)
    Run.objects.create(kind="verify", customer=customer, status="succeeded", started_at=start,
                       finished_at=start + timedelta(seconds=42), mutating=False)
    text = client.get("/metrics").content.decode()
    label = f'{{customer="{customer.domain}"}}'
    assert f"kasa_rto_seconds{label} 42.0" in text
    assert f"kasa_outside_rpo{label} 0.0" in text
    rpo = float(next(line.split()[-1] for line in text.splitlines() if line.startswith(f"kasa_rpo_seconds{label}")))
    assert 86000 < rpo < 87000
    assert f"kasa_rpo_target_seconds{label} {settings.KASA_RPO_HOURS * 3600:.1f}" in text


@pytest.mark.smoke
def test_a_policy_with_drills_gets_a_verify_schedule_that_drills_the_newest_backup(make_customer):
    from backups.schedules import schedules_sync

    customer = make_customer()
    BackupPolicy.objects.create(customer=customer, target=default_target(), verify_schedule="weekly")
    schedules_sync()
    row = Schedule.objects.get(name=f"verify: {customer.domain}")
    assert row.func == "backups.tasks.scheduled_verify" and row.args == repr(customer.pk)
    hour = int(row.cron.split()[1])
    assert 6 <= hour < 12  # after the night's backups
    assert scheduled_verify(customer.pk) == "skipped: no successful backup"
    _backup_row(customer, days_ago=2)
    newest = _backup_row(customer, days_ago=1)
    assert scheduled_verify(customer.pk).endswith(f"(backup #{newest.pk})")
    run = Run.objects.get(kind="verify", customer=customer)
    assert run.params == {"backup": newest.pk}


def test_a_failed_backup_is_never_offered_for_restore(make_customer):
    customer = make_customer()
    bk = _backup_row(customer, days_ago=1, status="failed")
    code, out = command_json("restore", str(bk.pk), "--yes")
    assert code == 2 and "only a succeeded backup can be restored" in out["error"]
    code, out = command_json("verify", str(bk.pk))
    assert code == 2 and "only a succeeded backup" in out["error"]


def _hostile_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        ok = tarfile.TarInfo("backend/ok.txt")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"ok\n"))
        link = tarfile.TarInfo("backend/escape")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../../../etc"
        tar.addfile(link)
        evil = tarfile.TarInfo("backend/escape/kasa-was-here")
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    return buf.getvalue()


def test_restore_refuses_a_hostile_archive_before_anything_lands(make_customer, customer_root, tmp_path):
    """A backup whose service archive writes through a symlink out of the tree: refused, nothing touched."""
    (customer_root / "backend" / "keep.txt").parent.mkdir(parents=True, exist_ok=True)
    (customer_root / "backend" / "keep.txt").write_text("live\n")
    customer = make_customer(services=("backend",))
    before = tree_state(customer_root.parent)
    raw = tmp_path / "hostile.tar"
    raw.write_bytes(_hostile_tar())
    target = default_target()
    bk = Backup.objects.create(customer=customer, target=target, status="succeeded", scope="files",
                               prefix=f"{customer.domain}/hostile", started_at=timezone.now(),
                               finished_at=timezone.now(), compression="none")
    res = write_artifact(ProcessChain([Stage(["cat"])], stdin_path=str(raw)), target.store(),
                         f"{bk.prefix}/backend.tar.enc", keyring=KeyRing(settings.KASA_BACKUP_KEYS))
    BackupArtifact.objects.create(backup=bk, name="backend.tar.enc", kind="service", source="backend",
                                  size=res.size, sha256=res.sha256, compression="none", key_id=res.key_id,
                                  details={"path": "backend"})
    code, out = command_json("restore", str(bk.pk), "--yes")
    assert code == 1 and "backend/escape" in out["error"] and "nothing was touched" in out["error"]
    assert tree_state(customer_root.parent) == before
    assert Backup.objects.filter(customer=customer).count() == 1  # refused before the safety backup
