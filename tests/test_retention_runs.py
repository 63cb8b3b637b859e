"""Retention with real runs: what was restored from and verified survives the safety backups that follow."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command

from backups.models import Backup, BackupPolicy
from backups.services import default_target, prune_customer
from tests.test_upgrades import _cli, customer_factory, fast_health, releases  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_backup_restored_from_and_verified_survives_the_upgrade_safety_backup_and_retention(
        customer_factory, releases):  # noqa: F811
    customer = customer_factory()
    # The tightest policy: one backup by count. Safety backups must still not push B out.
    BackupPolicy.objects.create(customer=customer, target=default_target(), keep_last=1)
    code, doc = _cli("backup", customer.domain)
    assert code == 0, doc
    b = doc["id"]
    code, run = _cli("verify", str(b))
    assert code == 0, run
    code, run = _cli("restore", str(b), "--yes")
    assert code == 0, run
    restore_safety = Backup.objects.get(customer=customer, trigger="restore")
    assert restore_safety.pinned  # a restore keeps its own safety backup pinned
    code, up = _cli("upgrade", customer.domain, "--to", "2.5")
    assert code == 0 and up["status"] == "succeeded", up
    upgrade_safety = Backup.objects.get(customer=customer, trigger="upgrade")
    assert upgrade_safety.pinned and upgrade_safety.finished_at > restore_safety.finished_at
    # The upgrade's backup ran retention on success; B is still there, verified.
    bk = Backup.objects.get(pk=b)
    assert bk.status == Backup.Status.SUCCEEDED and bk.verified_at is not None
    plan = prune_customer(customer, dry_run=True)
    assert b not in plan.delete
    reasons = plan.keep[b]
    assert "newest verified" in reasons and "last 1" in reasons
    assert any(r.startswith("restored from on ") for r in reasons)
    out = io.StringIO()
    call_command("prune", customer.domain, "--dry-run", stdout=out)
    assert f"  keep #{b}: newest verified, restored from on " in out.getvalue()
