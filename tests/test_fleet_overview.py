"""The fleet overview on the admin index and the fleet's daily pages at scale (issue 12, points 8 and 12).

The overview counts customers by state, lists those needing attention worst first and the recent failures, for
the user's teams only. The index, the backups, runs and customers changelists, a customer page and /metrics make
as many queries for 30 customers as for 3 (the 150 ms goal at 2,000 customers is bench/admin_scale's business:
no test asserts time).
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import Count
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from backups.models import Backup, BackupArtifact, BackupPolicy
from backups.services import default_target
from console.overview import overview
from customers.models import Team
from operations.models import Run, RunTally
from upgrades.models import Upgrade

pytestmark = [pytest.mark.smoke, pytest.mark.django_db]


def backup(customer, *, hours_ago: float, verified=False, status="succeeded", artifacts=2):
    finished = timezone.now() - timedelta(hours=hours_ago)
    run = Run.objects.create(kind="backup", customer=customer, status=status, mutating=True,
                             created_at=finished - timedelta(minutes=2), started_at=finished - timedelta(minutes=2),
                             finished_at=finished, error="tar failed" if status == "failed" else "")
    b = Backup.objects.create(customer=customer, run=run, target=default_target(), status=status, scope="full",
                              size=1000, started_at=run.started_at, finished_at=finished,
                              prefix=f"{customer.domain}/{uuid.uuid4().hex[:8]}",
                              verify_status="passed" if verified else "never",
                              verified_at=finished if verified else None)
    for i in range(artifacts if status == "succeeded" else 0):
        BackupArtifact.objects.create(backup=b, name=f"a{i}.tar.zst", kind="service", source="backend", size=500,
                                      sha256="0" * 64, compression="zstd")
    return b


def upgrade(customer, status):
    run_status = {"running": "running", "quarantined": "failed"}[status]
    run = Run.objects.create(kind="upgrade", customer=customer, status=run_status, mutating=True,
                             started_at=timezone.now() - timedelta(minutes=5),
                             finished_at=None if status == "running" else timezone.now(),
                             error="rollback failed" if status == "quarantined" else "")
    return Upgrade.objects.create(customer=customer, run=run, status=status)


def populated(make_customer, team, n):
    """n customers, each with five backups (one verified), a drill, a check and a failed check."""
    out = []
    for _ in range(n):
        c = make_customer(team_=team)
        for h in (50, 40, 30, 20):
            backup(c, hours_ago=h)
        backup(c, hours_ago=2, verified=True)
        start = timezone.now() - timedelta(hours=1)
        Run.objects.create(kind="verify", customer=c, status="succeeded", mutating=False, started_at=start,
                           finished_at=start + timedelta(seconds=30))
        Run.objects.create(kind="check", customer=c, status="succeeded", mutating=False, started_at=start,
                           finished_at=start + timedelta(seconds=3))
        Run.objects.create(kind="check", customer=c, status="failed", mutating=False, started_at=start,
                           finished_at=start + timedelta(seconds=3), error="database down")
        out.append(c)
    return out


PAGES = ["/", "/backups/backup/", "/operations/run/", "/customers/customer/", "/metrics"]


def query_counts(client, users, customer) -> dict:
    counts = {}
    for name, user in users.items():
        client.force_login(user)
        for url in [*PAGES, f"/customers/customer/{customer.pk}/change/"]:
            client.get(url)  # the first request of a session saves it, and the content types get cached
            with CaptureQueriesContext(connection) as ctx:
                response = client.get(url)
            assert response.status_code == 200, (name, url)
            counts[(name, url.replace(str(customer.pk), "ID"))] = len(ctx.captured_queries)
    return counts


def test_the_daily_pages_make_as_many_queries_for_30_customers_as_for_3(client, make_customer, team, staff_user,
                                                                        django_user_model):
    users = {"superuser": django_user_model.objects.create_superuser(f"root-{uuid.uuid4().hex[:6]}", password="x"),
             "team member": staff_user(team)}
    first = populated(make_customer, team, 3)
    backup(first[0], hours_ago=1, status="failed")
    upgrade(first[1], "quarantined")
    small = query_counts(client, users, first[0])
    more = populated(make_customer, team, 27)
    backup(more[0], hours_ago=1, status="failed")
    upgrade(more[1], "running")
    upgrade(more[2], "quarantined")
    BackupPolicy.objects.create(customer=more[3], target=default_target(), rpo_hours=1)
    large = query_counts(client, users, first[0])
    assert large == small


def test_the_overview_counts_each_state_and_lists_the_worst_first(make_customer, team, staff_user):
    user = staff_user(team)
    c = {name: make_customer(domain=f"{name}.example.com", team_=team) for name in (
        "healthy", "stale", "never", "failing", "upgrading", "quarantined", "slow")}
    backup(c["healthy"], hours_ago=1, verified=True)
    backup(c["stale"], hours_ago=100, verified=True)  # outside the default RPO
    backup(c["never"], hours_ago=1)  # a backup, never verified
    backup(c["failing"], hours_ago=3, verified=True)
    backup(c["failing"], hours_ago=1, status="failed")
    backup(c["upgrading"], hours_ago=1, verified=True)
    upgrade(c["upgrading"], "running")
    backup(c["quarantined"], hours_ago=1, verified=True)
    upgrade(c["quarantined"], "quarantined")
    backup(c["slow"], hours_ago=1, verified=True)
    start = timezone.now() - timedelta(hours=1)
    Run.objects.create(kind="verify", customer=c["slow"], status="succeeded", mutating=False, started_at=start,
                       finished_at=start + timedelta(hours=5))  # longer than the default RTO
    o = overview(user)
    assert o.customers == 7
    assert o.counts == {"healthy": 2, "outside_rpo": 2, "last_failed": 1, "upgrading": 1, "quarantined": 1,
                        "never_verified": 1, "outside_rto": 1, "no_immutable": 0}  # healthy: "healthy", "slow"
    assert [x.domain for x in o.attention] == ["quarantined.example.com", "failing.example.com",
                                               "never.example.com", "stale.example.com", "slow.example.com"]
    assert o.attention_total == 5
    assert o.attention[0].problems == ["quarantined"]
    assert o.attention[2].rpo_text == "never verified" and "outside RPO" in o.attention[2].problems
    # Recent failures: the failed backup's run and the quarantined upgrade's run, newest first.
    assert {r.customer.domain for r in o.failures} == {"failing.example.com", "quarantined.example.com"}
    finished = [r.finished_at for r in o.failures]
    assert finished == sorted(finished, reverse=True)


def test_the_index_shows_the_overview_above_the_app_list_with_links(client, make_customer, team, staff_user):
    user = staff_user(team)
    failing = make_customer(team_=team)
    failed = backup(failing, hours_ago=1, status="failed")
    client.force_login(user)
    html = client.get("/").content.decode()
    assert html.index('id="kasa-fleet"') < html.index('id="content-main"') or html.index(
        'id="kasa-fleet"') < html.index("app-customers")
    assert f'href="/customers/customer/{failing.pk}/change/"' in html
    assert f'href="/operations/run/{failed.run_id}/change/"' in html
    assert "1 last backup failed" in html and "0 healthy" in html


def test_the_overview_never_shows_another_teams_customers(client, make_customer, team, staff_user):
    other = Team.objects.create(name=f"other-{uuid.uuid4().hex[:6]}")
    mine = make_customer(team_=team)
    theirs = make_customer(team_=other)
    backup(mine, hours_ago=1, verified=True)
    backup(theirs, hours_ago=1, status="failed")
    upgrade(theirs, "quarantined")
    user = staff_user(team)
    o = overview(user)
    assert o.customers == 1 and o.counts["healthy"] == 1 and o.counts["quarantined"] == 0
    assert o.attention == [] and o.failures == []
    client.force_login(user)
    html = client.get("/").content.decode()
    assert theirs.domain not in html and "Nothing needs attention" in html
    assert overview(staff_user()).customers == 0  # no team: nothing


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the tally's trigger is PostgreSQL's")
def test_the_run_tally_follows_every_change_of_the_runs(make_customer, team):
    a, b = make_customer(team_=team), make_customer(team_=team)
    run = Run.objects.create(kind="check", customer=a, status="pending", mutating=False)
    Run.objects.create(kind="backup", customer=b, status="failed", mutating=True,
                       started_at=timezone.now() - timedelta(seconds=9), finished_at=timezone.now())
    run.start("worker:1")
    Run.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now())  # no change of state: no tally change
    run.succeed({})
    Run.objects.filter(customer=b).update(status="succeeded")
    Run.objects.create(kind="check", customer=a, status="cancelled", mutating=False).delete()

    def tally():
        return {(t.customer_id, t.kind, t.status): (t.runs, t.timed) for t in RunTally.objects.filter(runs__gt=0)}

    live = {(r["customer"], r["kind"], r["status"]): (r["n"], r["n"])
            for r in Run.objects.values("customer", "kind", "status").annotate(n=Count("id"))}
    assert tally() == live == {(a.pk, "check", "succeeded"): (1, 1), (b.pk, "backup", "succeeded"): (1, 1)}
    seconds = RunTally.objects.get(customer=b, kind="backup", status="succeeded").seconds
    assert 8.9 < seconds < 9.1


def test_changelists_page_by_an_estimate_above_the_exact_limit(client, make_customer, team, staff_user,
                                                                monkeypatch):
    from core import paging

    monkeypatch.setattr(paging, "EXACT_UP_TO", 3)
    customer = make_customer(team_=team)
    for h in range(6):
        backup(customer, hours_ago=h + 1, artifacts=0)
    client.force_login(staff_user(team))
    for url in ("/backups/backup/", "/operations/run/", "/backups/backup/?status__exact=succeeded"):
        response = client.get(url)
        assert response.status_code == 200
        assert len(response.context["cl"].result_list) == 6


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the tally's trigger is PostgreSQL's")
def test_the_storage_tally_follows_succeeded_backups(make_customer, team):
    from backups.models import StorageTally
    from backups.recovery import fleet

    c = make_customer(team_=team)
    kept = backup(c, hours_ago=3)
    gone = backup(c, hours_ago=2)
    backup(c, hours_ago=1, status="failed")
    running = Backup.objects.create(customer=c, target=default_target(), status="running", size=0,
                                    prefix=f"{c.domain}/running")
    Backup.objects.filter(pk=running.pk).update(status="succeeded", size=4000)
    Backup.objects.filter(pk=gone.pk).update(status="deleted")
    Backup.objects.filter(pk=kept.pk).update(size=1500)
    tally = StorageTally.objects.get(customer=c)
    assert (tally.backups, tally.bytes) == (2, 5500)
    assert fleet([c])[0].storage == 5500


def _rollout_of(release, customers, *, upgraded=0):
    from customers.models import Customer
    from rollouts import planning, services

    Customer.objects.filter(pk__in=[c.pk for c in customers]).update(versions={"app": "1.0.0"})
    rollout = services.rollout_create(planning.plan(release, domains=[c.domain for c in customers], percents="100",
                                                    bakes="0"))
    for t in rollout.targets.order_by("pk")[:upgraded]:
        type(t).objects.filter(pk=t.pk).update(state="upgraded")
    return rollout


def test_the_overview_lists_the_active_rollouts_of_the_users_teams_with_their_progress(
        client, make_customer, team, staff_user, tmp_path):
    from rollouts.models import Rollout
    from tests.rollout_fixtures import sync_fleet_releases

    releases = sync_fleet_releases(tmp_path / "pkg")
    other = Team.objects.create(name=f"other-{uuid.uuid4().hex[:6]}")
    mine = _rollout_of(releases["1.1"], [make_customer(team_=team) for _ in range(3)], upgraded=2)
    theirs = _rollout_of(releases["1.1"], [make_customer(team_=other)])
    ended = _rollout_of(releases["1.2"], [make_customer(team_=team)])
    Rollout.objects.filter(pk=ended.pk).update(status="completed")
    user = staff_user(team)
    assert [r.pk for r in overview(user).rollouts] == [mine.pk]
    client.force_login(user)
    html = client.get("/").content.decode()
    assert f'href="/rollouts/rollout/{mine.pk}/change/"' in html and "2 of 3 upgraded" in html
    assert f"/rollouts/rollout/{theirs.pk}/" not in html and f"/rollouts/rollout/{ended.pk}/" not in html
