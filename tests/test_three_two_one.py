"""3-2-1 at a glance (issue 17, item 7): per customer, how many copies its newest verified backup has, how many
are off this host and how many are immutable; a policy that requires an immutable copy flags the customers
without one (the fleet overview's recovery alerts, the customer page, /metrics).

The lock fields are set directly here: writing them is the backup's business (tests/test_s3_lock.py)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from backups.models import Backup, BackupCopy, BackupPolicy, StorageTarget
from backups.recovery import fleet
from backups.services import default_target, global_policy
from console import metrics
from console.overview import overview
from customers.models import Team

pytestmark = [pytest.mark.django_db]


def _s3(*, locked=True) -> StorageTarget:
    return StorageTarget.objects.create(
        name=f"s3-{uuid.uuid4().hex[:8]}", kind="s3", bucket="kasa-copies",
        lock_mode="compliance" if locked else "", lock_days=7 if locked else 0)


def _verified(customer, *, hours_ago=1.0, target=None, **fields) -> Backup:
    finished = timezone.now() - timedelta(hours=hours_ago)
    return Backup.objects.create(
        customer=customer, target=target or default_target(), status="succeeded", scope="full", size=1000,
        started_at=finished - timedelta(minutes=1), finished_at=finished, verify_status="passed",
        verified_at=finished, prefix=f"{customer.domain}/{uuid.uuid4().hex[:8]}", **fields)


def _locked_copy(bk, *, days=5, status="succeeded") -> BackupCopy:
    return BackupCopy.objects.create(backup=bk, target=_s3(), status=status, lock_mode="compliance",
                                     locked_until=timezone.now() + timedelta(days=days))


def _gauge(text: str, name: str, domain: str) -> float:
    prefix = f'{name}{{customer="{domain}"}} '
    return float(next(line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)))


def _require_immutable(customer=None):
    if customer is None:
        policy = global_policy()
        policy.require_immutable = True
        policy.save()
        return policy
    return BackupPolicy.objects.create(customer=customer, target=default_target(), require_immutable=True)


def test_a_local_primary_and_a_locked_s3_copy_count_two_copies_one_off_host_one_immutable(
        client, make_customer, team, staff_user):
    customer = make_customer(team_=team)
    old = _verified(customer, hours_ago=30)
    _locked_copy(old)
    _locked_copy(old)
    newest = _verified(customer)
    _locked_copy(newest)
    BackupCopy.objects.create(backup=newest, target=_s3(locked=False), status="failed")  # a failed copy: none
    Backup.objects.create(customer=customer, target=default_target(), status="succeeded",  # newer, not verified
                          finished_at=timezone.now(), prefix=f"{customer.domain}/unverified")
    row = fleet([customer])[0]
    assert (row.copies, row.copies_offsite, row.copies_immutable) == (2, 1, 1)
    assert not row.no_immutable

    user = staff_user(team)
    client.force_login(user)
    page = client.get(f"/customers/customer/{customer.pk}/change/").content.decode()
    assert "2 copies · 1 off-host · 1 immutable" in page
    assert "policy requires one" not in page
    text = client.get("/metrics").content.decode()
    assert _gauge(text, "kasa_customer_backup_copies", customer.domain) == 2
    assert _gauge(text, "kasa_customer_backup_copies_offsite", customer.domain) == 1
    assert _gauge(text, "kasa_customer_backup_copies_immutable", customer.domain) == 1
    assert _gauge(text, "kasa_customer_immutable_required", customer.domain) == 0


def test_a_lock_that_has_ended_is_no_immutable_copy_and_an_s3_primary_is_off_host(make_customer):
    customer = make_customer()
    bk = _verified(customer, target=_s3(), lock_mode="compliance",
                   locked_until=timezone.now() - timedelta(minutes=1))  # the primary's lock ended a minute ago
    _locked_copy(bk, days=-1)
    BackupCopy.objects.create(backup=bk, target=default_target())  # a second copy, on this host
    row = fleet([customer])[0]
    assert (row.copies, row.copies_offsite, row.copies_immutable) == (3, 2, 0)
    Backup.objects.filter(pk=bk.pk).update(locked_until=timezone.now() + timedelta(days=1))
    assert fleet([customer])[0].copies_immutable == 1


def test_no_verified_backup_shows_a_dash_and_counts_no_copy(client, make_customer, admin_user):
    customer = make_customer()
    Backup.objects.create(customer=customer, target=_s3(), status="succeeded", finished_at=timezone.now(),
                          prefix=f"{customer.domain}/never-verified")
    row = fleet([customer])[0]
    assert (row.copies, row.copies_offsite, row.copies_immutable) == (0, 0, 0) and row.copies_text == "—"
    client.force_login(admin_user)
    text = client.get("/metrics").content.decode()
    assert _gauge(text, "kasa_customer_backup_copies", customer.domain) == 0


def test_a_policy_requiring_an_immutable_copy_flags_the_customers_without_one(
        client, make_customer, team, staff_user):
    unlocked, locked, expired, unbound = (
        make_customer(domain=f"{name}.example.com", team_=team) for name in ("unlocked", "locked", "expired", "free"))
    _verified(unlocked)
    _locked_copy(_verified(locked))
    _locked_copy(_verified(expired), days=-2)
    _verified(unbound)
    _require_immutable()  # the global policy: every customer without a policy of its own
    BackupPolicy.objects.create(customer=unbound, target=default_target())  # its own policy requires nothing
    rows = {r.customer.domain: r for r in fleet([unlocked, locked, expired, unbound])}
    assert {d for d, r in rows.items() if r.no_immutable} == {unlocked.domain, expired.domain}

    user = staff_user(team)
    o = overview(user)
    assert o.counts["no_immutable"] == 2
    flagged = {c.domain: c.problems for c in o.attention}
    assert flagged == {unlocked.domain: ["no immutable copy (policy requires one)"],
                       expired.domain: ["no immutable copy (policy requires one)"]}

    client.force_login(user)
    index = client.get("/").content.decode()
    assert "2 without a required immutable copy" in index
    assert "no immutable copy (policy requires one)" in index and "1 copy · 0 off-host · 0 immutable" in index
    page = client.get(f"/customers/customer/{expired.pk}/change/").content.decode()
    assert 'id="customer-no-immutable"' in page and "1 copy · 0 off-host · 0 immutable" not in page
    assert "2 copies · 1 off-host · 0 immutable" in page
    assert 'id="customer-no-immutable"' not in client.get(f"/customers/customer/{locked.pk}/change/").content.decode()
    text = client.get("/metrics").content.decode()
    assert _gauge(text, "kasa_customer_immutable_required", unlocked.domain) == 1
    assert _gauge(text, "kasa_customer_backup_copies_immutable", unlocked.domain) == 0
    assert _gauge(text, "kasa_customer_immutable_required", unbound.domain) == 0
    assert _gauge(text, "kasa_customer_backup_copies_immutable", locked.domain) == 1


def test_a_customers_own_policy_can_require_an_immutable_copy_from_the_admin(admin_client, make_customer):
    customer = make_customer()
    _verified(customer)
    global_policy()
    form = {"customer": customer.pk, "schedule": "daily", "scope": "full", "compression": "zstd", "encrypt": "on",
            "target": default_target().pk, "keep_last": 5, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0,
            "keep_verified": 0, "excludes": "[]", "config_paths": "[]", "verify_schedule": "none",
            "full_every_days": 7, "require_immutable": "on"}
    resp = admin_client.post("/backups/backuppolicy/add/", form)
    assert resp.status_code == 302, resp.content.decode()[:3000]
    assert BackupPolicy.objects.get(customer=customer).require_immutable
    assert fleet([customer])[0].no_immutable
    assert 'name="require_immutable"' in admin_client.get("/backups/backuppolicy/add/").content.decode()


def test_a_team_member_sees_only_their_teams_figures(client, make_customer, team, staff_user):
    other = Team.objects.create(name=f"other-{uuid.uuid4().hex[:6]}")
    mine = make_customer(team_=team)
    theirs = make_customer(team_=other)
    _verified(mine)
    _locked_copy(_verified(theirs), days=-1)
    _require_immutable(theirs)  # flagged, in the other team
    assert overview(staff_user(other)).counts["no_immutable"] == 1
    user = staff_user(team)
    assert overview(user).counts["no_immutable"] == 0
    scoped = metrics.render(user=user).decode()
    assert f'customer="{mine.domain}"' in scoped and theirs.domain not in scoped
    client.force_login(user)
    index = client.get("/").content.decode()
    assert theirs.domain not in index and "0 without a required immutable copy" in index
    assert client.get(f"/customers/customer/{theirs.pk}/change/").status_code in (302, 403, 404)
