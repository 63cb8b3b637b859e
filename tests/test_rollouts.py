"""Fleet rollouts (rollouts/): a release taken to a fleet in waves, with gates, bakes, pauses and a safe halt.

The fleet is real: each customer's app runs under PM2 from npm and answers its health URL, its database is SQLite
or PostgreSQL, and each upgrade is the real per-customer upgrade (backup, hooks, switch, health, rollback).
Prometheus gates ask Debian's `prometheus` server, which evaluates the PromQL.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from engines import rolloutplan
from tests import rollout_fixtures
from tests.conftest import free_ports, port_open, require, wait_until

fleet = rollout_fixtures.fleet  # the fixture, shared with tests/test_browser_rollouts.py


def _cli(*args) -> tuple[int, dict]:
    from django.core.management import CommandError, call_command

    out = io.StringIO()
    try:
        call_command("rollout", *args, "--json", stdout=out, stderr=io.StringIO())
        code = 0
    except CommandError as exc:
        code = exc.returncode
    text = out.getvalue().strip()
    return code, (json.loads(text) if text else {})


def _get(url: str) -> str:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as resp:
        return resp.read().decode()


def _rows(c) -> list:
    """The customer's items, from its own database."""
    if c.pg is None:
        import sqlite3

        con = sqlite3.connect(Path(c.root) / "data" / "app.sqlite3")
        try:
            return con.execute("SELECT id, note FROM items ORDER BY id").fetchall()
        finally:
            con.close()
    import psycopg

    with psycopg.connect(c.pg["url"]) as con:
        return con.execute("SELECT id, note FROM items ORDER BY id").fetchall()


# --- the arithmetic (no Django) ---------------------------------------------------------------------------------
@pytest.mark.smoke
def test_waves_are_cumulative_percentages_rounded_up_with_at_least_one_customer_each():
    assert rolloutplan.wave_counts(12, [10, 50, 100]) == [(10, 2), (50, 4), (100, 6)]
    assert rolloutplan.wave_counts(3, [10, 25, 50, 100]) == [(10, 1), (25, 1), (50, 1)]  # a wave per customer
    assert rolloutplan.wave_counts(200, [10, 25, 50, 100]) == [(10, 20), (25, 30), (50, 50), (100, 100)]
    assert rolloutplan.parse_bakes("30m,1h,2h", 4) == [1800, 3600, 7200, 0]
    assert rolloutplan.parse_bakes("0", 3) == [0, 0, 0]
    assert rolloutplan.parse_bakes("90s", 3) == [90, 90, 0]
    for bad in ("10,5,100", "10,50", "0,100", "ten"):
        with pytest.raises(rolloutplan.PlanError):
            rolloutplan.parse_percents(bad)
    members = [(f"c{i}.example.com", i == 7) for i in range(10)]
    first = rolloutplan.assign_waves(members, [10, 50, 100])
    assert first == rolloutplan.assign_waves(list(reversed(members)), [10, 50, 100])  # stable, whatever the order
    assert first[0][1] == ["c7.example.com"]  # the canary first


@pytest.mark.smoke
def test_a_window_spanning_midnight_contains_the_night_and_names_its_next_opening():
    from datetime import datetime

    win = rolloutplan.parse_window("22:00-04:00", "Europe/Berlin")
    assert win.contains(datetime(2026, 12, 5, 23, 30, tzinfo=UTC))  # 00:30 in Berlin
    assert not win.contains(datetime(2026, 12, 5, 12, 0, tzinfo=UTC))
    opens = win.next_opening(datetime(2026, 12, 5, 12, 0, tzinfo=UTC))
    assert opens.astimezone(UTC) == datetime(2026, 12, 5, 21, 0, tzinfo=UTC)
    with pytest.raises(rolloutplan.PlanError, match="time zone"):
        rolloutplan.parse_window("01:00-05:00", "Mars/Olympus")


# --- planning ----------------------------------------------------------------------------------------------------
def test_the_plan_skips_pinned_bad_installed_and_busy_customers_and_puts_canaries_first(make_customer, tmp_path):
    from customers.models import Customer
    from rollouts import planning, services
    from tests.rollout_fixtures import sync_fleet_releases
    from upgrades.models import BadRelease

    releases = sync_fleet_releases(tmp_path / "pkg")
    cs = [make_customer(f"p{i}.example.com") for i in range(8)]
    Customer.objects.filter(pk__in=[c.pk for c in cs]).update(versions={"app": "1.0.0"})
    Customer.objects.filter(pk=cs[0].pk).update(version_pin="1.0", version_pin_reason="waits for its audit")
    BadRelease.objects.create(customer=cs[1], release=releases["1.1"], reason="rolled back on 1 Dec")
    Customer.objects.filter(pk=cs[2].pk).update(versions={"app": "1.1.0"})
    Customer.objects.filter(pk=cs[3].pk).update(versions={})
    Customer.objects.filter(pk=cs[7].pk).update(tags="canary")
    plan = planning.plan(releases["1.1"], percents="25,100", bakes="0")
    reasons = {s["domain"]: s["reason"] for s in plan.skipped}
    assert "pinned to 1.0: waits for its audit" in reasons["p0.example.com"]
    assert "failed for it before" in reasons["p1.example.com"]
    assert reasons["p2.example.com"] == "already on 1.1"
    assert "no release installed" in reasons["p3.example.com"]
    assert [len(w) for w in plan.waves] == [1, 3] and plan.waves[0][0].domain == "p7.example.com"
    assert plan.document() == planning.plan(releases["1.1"], percents="25,100", bakes="0").document()

    rollout = services.rollout_create(plan)
    again = planning.plan(releases["1.1"], domains=["p4.example.com"], percents="100", bakes="0")
    assert again.skipped == [{"domain": "p4.example.com", "reason": f"in rollout #{rollout.pk}"}]
    with pytest.raises(services.RolloutError, match="no customer"):
        services.rollout_create(again)
    only_tagged = planning.plan(releases["1.1"], tags=["Canary"], percents="100", bakes="0")
    assert [c.domain for c in only_tagged.members] == [] and only_tagged.skipped[0]["reason"].startswith("in rollout")


# --- the fleet ---------------------------------------------------------------------------------------------------
def test_a_fleet_rolls_to_a_good_release_in_three_waves_and_everyone_ends_on_it(fleet):
    from customers.models import Customer
    from rollouts.models import Rollout

    # Seven customers (five SQLite, two PostgreSQL) are enough for three waves of different sizes; every upgrade
    # is a real one (PM2, migration, health), so a bigger fleet only costs minutes of the suite.
    customers = fleet.make(sqlite=5, pg=2, tags={4: "canary"})
    code, doc = _cli("start", "--to", "1.1", "--waves", "15,50,100", "--bake", "0")
    assert code == 0, doc
    assert doc["status"] == "completed" and doc["counts"] == {"upgraded": 7}
    assert [len(w["customers"]) for w in doc["waves"]] == [2, 2, 3]
    assert customers[4].domain in [c["customer"] for c in doc["waves"][0]["customers"]]  # the canary goes first
    for w in doc["waves"]:
        assert w["state"] == "succeeded"
        assert {g["gate"]: g["result"] for g in w["gates"]} == {"failures": "successful", "health": "successful"}
    for c in customers:
        assert Customer.objects.get(pk=c.pk).versions == {"app": "1.1.0"}
        assert _get(f"http://127.0.0.1:{c.port}/version") == "1.1.0"
        assert all(note.endswith(" 1.1.0") for _, note in _rows(c))  # its migration ran against its own database
    rollout = Rollout.objects.get(pk=doc["id"])
    assert not rollout.targets.filter(active=True).exists()  # the customers are free for the next rollout


def test_a_failing_migration_in_the_first_wave_halts_with_that_customer_rolled_back_and_the_rest_untouched(
        fleet, settings, mailoutbox):
    from customers.models import Customer
    from tests.restore_helpers import tree_state
    from tests.rollout_fixtures import files_state
    from upgrades.models import Upgrade

    customers = fleet.make(sqlite=3, pg=1)
    settings.KASA_ROLLOUT_EMAILS = ["ops@example.com"]
    before = {c.pk: (files_state(Path(c.root)), tree_state(Path(c.root)), _rows(c)) for c in customers}
    code, doc = _cli("start", "--to", "1.2", "--waves", "25,100", "--bake", "0", "--concurrency", "1")
    assert code == 1 and doc["status"] == "halted", doc
    assert "wave 1" in doc["reason"] and "failed upgrade" in doc["reason"]
    first = doc["waves"][0]["customers"][0]
    assert first["state"] == "failed" and first["upgrade_status"] == Upgrade.Status.ROLLED_BACK
    assert doc["waves"][1]["state"] == "pending" and {c["state"] for c in doc["waves"][1]["customers"]} == {
        "not_started"}
    for c in customers:
        files, tree, rows = before[c.pk]
        assert Customer.objects.get(pk=c.pk).versions == {"app": "1.0.0"}
        assert _get(f"http://127.0.0.1:{c.port}/version") == "1.0.0"
        assert _rows(c) == rows  # the half-done migration of the failed one was put back
        if c.domain == first["customer"]:
            assert tree_state(Path(c.root)) == tree  # rolled back: the same files and modes
        else:
            assert files_state(Path(c.root)) == files  # never touched: byte for byte
    [mail] = mailoutbox
    assert "halted" in mail.subject and "1 failed" in mail.body and "3 not started" in mail.body


def test_revert_mode_rolls_back_the_earlier_waves_when_a_later_wave_fails(fleet):
    from customers.models import Customer
    from rollouts import planning

    customers = fleet.make(sqlite=3)
    plan = planning.plan(fleet.releases["1.1"], domains=[c.domain for c in customers], percents="33,100",
                         bakes="0")
    late = {c.domain for c in plan.waves[1]}
    for c in customers:
        if c.domain in late:  # their migration fails: wave 2 fails after wave 1 has upgraded
            env = Path(c.root) / "app" / ".env"
            env.write_text(env.read_text() + "FAIL_MIGRATE=1\n")
    code, doc = _cli("start", "--to", "1.1", "--waves", "33,100", "--bake", "0", "--on-failure", "revert")
    assert code == 1 and doc["status"] == "aborted", doc
    early = doc["waves"][0]["customers"][0]
    assert early["state"] == "reverted" and early["revert"]
    assert {c["state"] for c in doc["waves"][1]["customers"]} == {"failed"}
    for c in customers:
        assert Customer.objects.get(pk=c.pk).versions == {"app": "1.0.0"}
        assert _get(f"http://127.0.0.1:{c.port}/version") == "1.0.0"
        assert all(not note.endswith("1.1.0") for _, note in _rows(c))


def test_pause_and_resume_during_a_bake_and_a_driver_lost_mid_tick_is_taken_over_once_its_lease_ends(fleet):
    from operations.services import run_execute
    from rollouts import driver, services
    from rollouts.models import Rollout, RolloutWave

    fleet.make(sqlite=2)
    code, doc = _cli("start", "--to", "1.1", "--waves", "50,100", "--bake", "2s", "--enqueue")
    assert code == 0 and doc["status"] == "scheduled", doc
    rollout = Rollout.objects.get(pk=doc["id"])

    def tick():  # what the worker's scheduler does, its runs executed at once
        return driver.advance(rollout.pk, start_run=lambda run: run_execute(run.pk))

    wait_until(lambda: tick() and rollout.waves.get(position=1).state == RolloutWave.State.BAKING, 60,
               what="wave 1 baking")
    services.rollout_pause(Rollout.objects.get(pk=rollout.pk), via="cli")
    time.sleep(2.2)  # the bake has run out meanwhile: a paused rollout still does not go on
    tick()
    rollout.refresh_from_db()
    assert rollout.status == "paused" and rollout.paused_by == "operator"
    assert rollout.waves.get(position=2).state == "pending"
    assert not rollout.targets.filter(wave__position=2).exclude(state="pending").exists()

    # A worker died mid-tick: its lease holds the rollout, then runs out and another tick takes over.
    services.rollout_resume(rollout, via="cli")
    Rollout.objects.filter(pk=rollout.pk).update(lease_until=timezone.now() + timedelta(minutes=5))
    assert tick() is None
    Rollout.objects.filter(pk=rollout.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    wait_until(lambda: (tick() or True) and Rollout.objects.get(pk=rollout.pk).status == "completed", 60,
               what="the rollout to complete")
    assert rollout.targets.filter(state="upgraded").count() == 2


def test_outside_its_window_a_rollout_starts_nothing_and_goes_on_when_the_window_opens(make_customer, tmp_path,
                                                                                     monkeypatch):
    from customers.models import Customer
    from operations.services import run_cancel
    from rollouts import driver, planning, services
    from tests.rollout_fixtures import sync_fleet_releases

    releases = sync_fleet_releases(tmp_path / "pkg")
    c = make_customer("w1.example.com")
    Customer.objects.filter(pk=c.pk).update(versions={"app": "1.0.0"})
    now = timezone.now()
    start = (now + timedelta(hours=2)).time().replace(second=0, microsecond=0)
    end = (now + timedelta(hours=3)).time().replace(second=0, microsecond=0)
    rollout = services.rollout_create(planning.plan(releases["1.1"], percents="100", bakes="0"),
                                      window=f"{start:%H:%M}-{end:%H:%M}")
    started = []
    driver.advance(rollout.pk, start_run=started.append)
    rollout.refresh_from_db()
    assert rollout.status == "paused" and rollout.paused_by == "window" and "outside its window" in rollout.reason
    assert started == [] and rollout.targets.get().upgrade is None

    later = now + timedelta(hours=2, minutes=10)
    monkeypatch.setattr(driver.timezone, "now", lambda: later)
    driver.advance(rollout.pk, start_run=started.append)
    rollout.refresh_from_db()
    assert rollout.status == "progressing" and len(started) == 1
    assert rollout.targets.get().state == "upgrading"
    run_cancel(started[0], via="cli")  # not executed here: the window's part is done


# --- gates against a real Prometheus -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def prometheus():
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    require(os.path.exists(binary), "Debian's prometheus (make system-deps)")
    folder = tempfile.mkdtemp(prefix="kasa-prom-")
    (Path(folder) / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n")
    port = free_ports(1)
    proc = subprocess.Popen([binary, f"--config.file={folder}/prometheus.yml", f"--storage.tsdb.path={folder}/data",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=folder)
    try:
        wait_until(lambda: port_open("127.0.0.1", port, 0.2) and _ready(port), 30, what="prometheus to be ready")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def _ready(port: int) -> bool:
    try:
        return "Ready" in _get(f"http://127.0.0.1:{port}/-/ready")
    except OSError:
        return False


def test_prometheus_gates_pass_fail_are_inconclusive_without_data_and_error_when_unreachable(
        prometheus, settings, make_customer, tmp_path):
    from rollouts import gates, planning, services
    from tests.rollout_fixtures import sync_fleet_releases

    releases = sync_fleet_releases(tmp_path / "pkg")
    c = make_customer("g1.example.com")
    type(c).objects.filter(pk=c.pk).update(versions={"app": "1.0.0"})
    rollout = services.rollout_create(planning.plan(releases["1.1"], percents="100", bakes="0"))
    settings.KASA_PROMETHEUS_URL = prometheus

    def measure(text):
        return gates.prometheus_gate(rollout, services.parse_prometheus(text))

    assert measure("vector(0.01) < 0.05").result == "successful"
    failed = measure("vector(1) < 0.5")
    assert failed.result == "failed" and "break < 0.5" in failed.summary
    nodata = measure('sum(http_errors_total{customer=~"$customers"}) < 1')
    assert nodata.result == "inconclusive" and nodata.evidence["samples"] == []
    assert measure("vector(1) +* 2 < 1").result == "error"  # Prometheus refuses the PromQL: HTTP 400
    settings.KASA_PROMETHEUS_URL = "http://127.0.0.1:9"
    assert measure("vector(0) < 1").result == "error"


def test_an_inconclusive_prometheus_gate_pauses_the_rollout_until_a_person_promotes_it(fleet, prometheus,
                                                                                        settings):
    from rollouts.models import Rollout

    settings.KASA_PROMETHEUS_URL = prometheus
    fleet.make(sqlite=2)
    code, doc = _cli("start", "--to", "1.1", "--waves", "50,100", "--bake", "0", "--enqueue", "--prometheus",
                     'sum(rate(http_requests_total{customer=~"$customers",code=~"5.."}[5m])) < 0.05')
    assert code == 0
    from operations.services import run_execute
    from rollouts import driver

    rid = doc["id"]
    wait_until(lambda: (driver.advance(rid, start_run=lambda run: run_execute(run.pk)) or True)
               and Rollout.objects.get(pk=rid).status == "paused", 60, what="the inconclusive pause")
    code, doc = _cli("show", str(rid))
    assert doc["paused_by"] == "inconclusive" and "no data" in doc["reason"]
    assert doc["waves"][1]["state"] == "pending"  # nothing of wave 2 started on missing data
    code, doc = _cli("promote", str(rid))  # a person accepts wave 1 without the data
    assert code == 0 and doc["waves"][0]["state"] == "succeeded"
    wait_until(lambda: (driver.advance(rid, start_run=lambda run: run_execute(run.pk)) or True)
               and Rollout.objects.get(pk=rid).status == "paused", 60, what="wave 2's gate")
    assert Rollout.objects.get(pk=rid).targets.filter(state="upgraded").count() == 2


# --- blue-green ---------------------------------------------------------------------------------------------------
def test_blue_green_checks_the_new_release_beside_the_live_one_and_keeps_the_old_one_until_its_grace_ends(fleet):
    from django.core.management import CommandError, call_command
    from django.utils import timezone

    from engines import procman
    from upgrades.models import Upgrade
    from upgrades.tasks import end_standbys

    [c] = fleet.make(sqlite=1)
    code, doc = _cli("start", "--to", "1.1", "--waves", "100", "--bake", "0", "--strategy", "blue-green")
    assert code == 0 and doc["status"] == "completed", doc
    up = Upgrade.objects.get(pk=doc["waves"][0]["customers"][0]["upgrade"])
    assert up.strategy == "blue-green"
    names = [s.name for s in up.steps.order_by("position")]
    assert names.index("migrate") < names.index("green") < names.index("stop")  # migrations once, before
    root = Path(c.root)
    # The smoke hook ran against the green copy on its own port while the live service still served 1.0.0.
    assert (root / "app" / "smoke-seen.txt").read_text() == "smoke 1.1.0 beside live 1.0.0\n"
    assert _get(f"http://127.0.0.1:{c.port}/version") == "1.1.0"
    svc = c.services.get(name="app")
    spec = procman.ServiceSpec(name="app", folder=str(root / "app"), manager="pm2", app_name=svc.app_name,
                               root=str(root), pm2_home=procman.pm2_home_for(root))
    # The green copy is gone; the previous release answers on its side port as the standby, for its grace period.
    assert sorted(a["name"] for a in procman.Pm2Manager().apps(spec)) == [svc.app_name, f"{svc.app_name}--previous"]
    assert not list(root.glob("ecosystem.kasa-green-*"))
    assert up.standby_live and names[-1] == "standby"
    standby_url = up.standby["services"]["app"]["url"]
    assert up.standby["services"]["app"]["version"] == "1.0.0"
    assert _get(standby_url.replace("/health", "/version")) == "1.0.0"

    # The grace period ends: the minute schedule stops it, and there is nothing left to switch back to.
    assert end_standbys() == []  # not due yet
    Upgrade.objects.filter(pk=up.pk).update(standby_until=timezone.now())
    assert end_standbys() == [up.pk]
    up.refresh_from_db()
    assert not up.standby_live and up.standby["ended_because"] == "its grace period ended"
    assert [a["name"] for a in procman.Pm2Manager().apps(spec)] == [svc.app_name]
    assert not list(root.glob("ecosystem.kasa-standby-*"))
    with pytest.raises(CommandError) as refused:
        call_command("rollback", c.domain, "--switch-back", stdout=io.StringIO(), stderr=io.StringIO())
    assert refused.value.returncode == 2 and "no standby to switch back to" in str(refused.value)
    assert _get(f"http://127.0.0.1:{c.port}/version") == "1.1.0"


def test_a_switch_back_within_the_grace_period_returns_to_the_standby_release_with_the_databases_as_they_are(
        fleet):
    import sqlite3
    from datetime import timedelta

    from django.core.management import call_command
    from django.utils import timezone

    from customers.models import Customer
    from engines import procman
    from operations.context import RunContext
    from operations.models import Run
    from upgrades import standby
    from upgrades.models import BadRelease, Upgrade

    [c] = fleet.make(sqlite=1)
    root = Path(c.root)
    out = io.StringIO()
    call_command("upgrade", c.domain, "--to", "1.1", "--strategy", "blue-green", "--json", stdout=out,
                 stderr=io.StringIO())
    doc = json.loads(out.getvalue())
    assert doc["status"] == "succeeded", doc
    up = Upgrade.objects.get(pk=doc["id"])
    assert up.standby_live and _get(f"http://127.0.0.1:{c.port}/version") == "1.1.0"
    # Written by the new release's users after the switch: a switch back keeps it (no database is restored).
    con = sqlite3.connect(root / "data" / "app.sqlite3")
    con.execute("INSERT INTO items (note) VALUES ('written on 1.1')")
    con.commit()
    con.close()
    before = _rows(c)
    # A backup (a run that only reads) leaves the standby running; a restore, an upgrade or a rollback ends it.
    standby.end_before_run(RunContext(Run.objects.create(customer=c, kind="backup", status="succeeded")))
    assert Upgrade.objects.get(pk=up.pk).standby_live

    out = io.StringIO()
    call_command("rollback", c.domain, "--switch-back", "--json", stdout=out, stderr=io.StringIO())
    doc = json.loads(out.getvalue())
    assert doc["status"] == "succeeded", doc
    steps = {st["name"]: st["status"] for st in doc["steps"]}
    assert steps["backup"] == "skipped" and steps["database"] == "skipped" and steps["switch"] == "succeeded"
    back = Upgrade.objects.get(pk=doc["id"])
    assert back.switch_back and back.backup_id is None
    assert _get(f"http://127.0.0.1:{c.port}/version") == "1.0.0"
    assert _rows(c) == before  # the row written on 1.1 is there, and 1.1's migration stays
    assert Customer.objects.get(pk=c.pk).versions == {"app": "1.0.0"}
    assert BadRelease.objects.filter(customer=c, release__name="1.1").exists()
    up.refresh_from_db()
    assert not up.standby_live and up.standby["ended_because"].startswith("switched back to it")
    svc = c.services.get(name="app")
    spec = procman.ServiceSpec(name="app", folder=str(root / "app"), manager="pm2", app_name=svc.app_name,
                               root=str(root), pm2_home=procman.pm2_home_for(root))
    assert [a["name"] for a in procman.Pm2Manager().apps(spec)] == [svc.app_name]

    # Had a standby still run, a restore (or an upgrade, or a full rollback) would have stopped it first.
    Upgrade.objects.filter(pk=up.pk).update(standby_until=timezone.now() + timedelta(minutes=5))
    restore = Run.objects.create(customer=c, kind="restore", status="succeeded")
    standby.end_before_run(RunContext(restore))
    up.refresh_from_db()
    assert not up.standby_live and up.standby["ended_because"] == f"restore run #{restore.pk} started"


def test_a_blue_green_upgrade_whose_smoke_test_fails_is_undone_before_any_switch_and_leaves_no_green_copy(fleet):
    from django.core.management import CommandError, call_command

    from customers.models import Customer
    from engines import procman

    [c] = fleet.make(sqlite=1)
    root = Path(c.root)
    env = root / "app" / ".env"
    env.write_text(env.read_text() + "FAIL_SMOKE=1\n")
    svc = c.services.get(name="app")
    spec = procman.ServiceSpec(name="app", folder=str(root / "app"), manager="pm2", app_name=svc.app_name,
                               root=str(root), pm2_home=procman.pm2_home_for(root))
    out = io.StringIO()
    with pytest.raises(CommandError) as failed:
        call_command("upgrade", c.domain, "--to", "1.1", "--strategy", "blue-green", "--json", stdout=out,
                     stderr=io.StringIO())
    doc = json.loads(out.getvalue())
    assert failed.value.returncode == 1 and doc["status"] == "rolled_back", doc
    assert "smoke hook" in doc["error"] and "answers wrong" in doc["error"]
    assert [a["name"] for a in procman.Pm2Manager().apps(spec)] == [svc.app_name]
    steps = [(st["name"], st["status"]) for st in doc["steps"]]
    # It failed beside the live service: nothing had stopped or switched it (the way back then restored the
    # database the migration had changed, which stops the services for a moment, as any rollback does).
    assert steps[steps.index(("green", "failed")) - 1] == ("migrate", "succeeded")
    assert not any(name in ("stop", "switch") for name, _ in steps)
    assert _get(f"http://127.0.0.1:{c.port}/version") == "1.0.0"
    assert Customer.objects.get(pk=c.pk).versions == {"app": "1.0.0"}
    assert not list(root.glob("ecosystem.kasa-green-*")) and not (root / "releases" / "1.1.0").exists()


# --- the admin (the browser half: tests/test_browser_rollouts.py) -------------------------------------------------
def test_the_admin_previews_the_plan_and_starts_only_with_the_release_typed_then_controls_it(
        client, make_customer, tmp_path, django_user_model):
    import re

    from customers.models import Customer
    from releases.models import Release
    from rollouts.models import Rollout
    from tests.rollout_fixtures import sync_fleet_releases

    sync_fleet_releases(tmp_path / "pkg")
    cs = [make_customer(f"adm{i}.example.com") for i in range(3)]
    Customer.objects.filter(pk__in=[c.pk for c in cs]).update(versions={"app": "1.0.0"})
    Customer.objects.filter(pk=cs[2].pk).update(version_pin="1.0", version_pin_reason="frozen")
    admin = django_user_model.objects.create_superuser("adm-rollouts", password="pw-Secret-123")
    client.force_login(admin)

    # The customers action opens the form with the selected domains; the release page links to it.
    page = client.post("/customers/customer/", {"action": "rollout_action",
                                                "_selected_action": [c.pk for c in cs]}).content.decode()
    assert 'id="rollout-form"' in page and "adm0.example.com\nadm1.example.com\nadm2.example.com" in page
    release_page = client.get(f"/releases/release/{Release.objects.get(name='1.1').pk}/change/")
    assert "/rollouts/rollout/start/?release=1.1" in release_page.content.decode()

    form = {"release": "1.1", "domains": "adm0.example.com\nadm1.example.com\nadm2.example.com", "waves": "50,100",
            "bakes": "30m", "concurrency": "2", "max_failures": "0", "on_failure": "halt", "health_gate": "on",
            "prom_op": "<", "window_zone": "UTC"}
    preview = client.post("/rollouts/rollout/start/", {**form, "_preview": "1"})
    text = preview.content.decode()
    assert preview.status_code == 200, text
    assert 'data-wave="1"' in text and 'data-wave="2"' in text and "pinned to 1.0: frozen" in text
    digest = re.search(r'name="digest" value="([0-9a-f]+)"', text)[1]
    wrong = client.post("/rollouts/rollout/start/", {**form, "_confirm": "1", "digest": digest, "confirm": "1.2"})
    assert wrong.status_code == 400 and "type 1.1 exactly" in wrong.content.decode()
    changed = client.post("/rollouts/rollout/start/", {**form, "waves": "100", "_confirm": "1", "digest": digest,
                                                        "confirm": "1.1"})
    assert changed.status_code == 400 and "changed since the preview" in changed.content.decode()
    assert not Rollout.objects.exists()
    started = client.post("/rollouts/rollout/start/", {**form, "_confirm": "1", "digest": digest, "confirm": "1.1"})
    rollout = Rollout.objects.get()
    assert started.status_code == 302 and started["Location"] == f"/rollouts/rollout/{rollout.pk}/change/"
    assert rollout.requested_via == "admin" and rollout.targets.count() == 2 and rollout.skipped[0]["domain"] == \
        "adm2.example.com"

    page = client.get(started["Location"]).content.decode()
    assert 'id="rollout-status" data-status="scheduled"' in page and "0 of 2 upgraded" in page
    assert 'id="rollout-pause"' in page and 'data-ws-path="/ws/rollouts/' in page
    # A control refused by the service says why and changes nothing; abort applies.
    after = client.post(f"/rollouts/rollout/{rollout.pk}/control/promote_all/", {"confirm": "promote"}, follow=True)
    assert "to skip every remaining bake and gate" in after.content.decode(), after.content.decode()[-6000:]
    client.post(f"/rollouts/rollout/{rollout.pk}/control/abort/", {})
    rollout.refresh_from_db()
    assert rollout.status == "aborting" and not rollout.reverting


def test_a_failure_the_wave_allows_does_not_stop_the_next_wave(make_customer, tmp_path):
    from customers.models import Customer
    from rollouts import driver, planning, services
    from tests.rollout_fixtures import sync_fleet_releases
    from upgrades.models import Upgrade

    releases = sync_fleet_releases(tmp_path / "pkg")
    for i in range(2):
        c = make_customer(f"mf{i}.example.com")
        Customer.objects.filter(pk=c.pk).update(versions={"app": "1.0.0"})
    rollout = services.rollout_create(planning.plan(releases["1.1"], percents="50,100", bakes="0"), max_failures=1)
    started = []
    driver.advance(rollout.pk, start_run=started.append)  # not executed: its outcome is written below
    [first] = started
    Upgrade.objects.filter(run=first).update(status=Upgrade.Status.ROLLED_BACK, error="migration failed")
    driver.advance(rollout.pk, start_run=started.append)
    rollout.refresh_from_db()
    assert rollout.status == "progressing", rollout.reason
    assert rollout.targets.get(wave__position=1).state == "failed"
    assert rollout.targets.get(wave__position=2).state == "upgrading" and len(started) == 2
