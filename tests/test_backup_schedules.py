"""Backup schedules: policies become django-q2 schedules, and a real worker fires them.

The per-host backup cap (operations/slots.py) is tested in tests/test_slots.py.
"""

import io
import json
import os
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from django_q.models import Schedule, Success

from backups import schedules
from backups.models import Backup, BackupPolicy
from backups.schedules import ScheduleError, allowed_age, cron_for, schedules_sync
from backups.services import default_target, global_policy
from backups.tasks import scheduled_backup
from operations.models import Run
from tests.conftest import wait_for_run, wait_until


def _policy(customer, schedule, cron="", **extra):
    return BackupPolicy.objects.create(customer=customer, schedule=schedule, cron=cron, target=default_target(),
                                       **extra)


def _backup_schedules():
    return {s.name: s for s in Schedule.objects.filter(func=schedules.BACKUP_FUNC)}


# --- policies → schedule rows ---------------------------------------------------------
@pytest.mark.django_db
def test_each_policy_becomes_one_cron_schedule_named_after_the_customer(make_customer):
    gp = global_policy()
    gp.schedule = BackupPolicy.Schedule.DAILY
    gp.save()
    daily, hourly, weekly, monthly, custom, unscheduled = (make_customer() for _ in range(6))
    _policy(hourly, "hourly")
    _policy(weekly, "weekly")
    _policy(monthly, "monthly")
    _policy(custom, "cron", cron=" 30 2 * * 1-5 ")
    _policy(unscheduled, "none")

    result = schedules_sync()

    rows = _backup_schedules()
    assert set(rows) == {f"backup: {c.domain}" for c in (daily, hourly, weekly, monthly, custom)}
    for c in (daily, hourly, weekly, monthly, custom):
        s = rows[f"backup: {c.domain}"]
        assert s.func == "backups.tasks.scheduled_backup" and s.schedule_type == Schedule.CRON
        assert s.args == repr(c.pk) and s.repeats == -1
        assert s.next_run > timezone.now()  # never "due at once": creating 500 schedules starts nothing
    fields = {c: rows[f"backup: {c.domain}"].cron.split() for c in (daily, hourly, weekly, monthly)}
    assert fields[hourly][1:] == ["*", "*", "*", "*"]
    assert fields[daily][2:] == ["*", "*", "*"] and 0 <= int(fields[daily][1]) < schedules.NIGHT_HOURS
    assert fields[weekly][2:4] == ["*", "*"] and 0 <= int(fields[weekly][4]) <= 6
    assert 1 <= int(fields[monthly][2]) <= 28 and fields[monthly][3:] == ["*", "*"]
    assert rows[f"backup: {custom.domain}"].cron == "30 2 * * 1-5"
    assert sorted(result["created"]) == sorted([*rows, schedules.MISSED_NAME])
    missed = Schedule.objects.get(func="backups.tasks.check_missed_backups")
    assert missed.name == schedules.MISSED_NAME and missed.schedule_type == Schedule.MINUTES and missed.minutes == 5

    # Idempotent: a second sync changes nothing, not even next_run.
    before = {n: s.next_run for n, s in rows.items()}
    again = schedules_sync()
    assert again["created"] == again["updated"] == again["removed"] == []
    assert {n: s.next_run for n, s in _backup_schedules().items()} == before


def test_preset_start_times_are_deterministic_and_spread_over_the_night():
    policy = BackupPolicy(schedule=BackupPolicy.Schedule.DAILY)
    domains = [f"shop{i}.example.com" for i in range(500)]
    crons = [cron_for(policy, d) for d in domains]
    assert crons == [cron_for(policy, d) for d in domains]
    starts = {tuple(c.split()[:2]) for c in crons}
    assert len(starts) > 250  # 500 customers do not all start at 02:00 (360 possible slots)
    assert {int(c.split()[1]) for c in crons} == set(range(schedules.NIGHT_HOURS))


@pytest.mark.django_db
def test_changed_removed_and_deleted_policies_update_the_schedules(make_customer):
    global_policy()
    a, b, c = make_customer(), make_customer(), make_customer()
    pa = _policy(a, "cron", cron="0 3 * * *")
    pb = _policy(b, "daily")
    schedules_sync()
    old = _backup_schedules()[f"backup: {a.domain}"]

    pa.cron = "15 4 * * *"
    pa.save()
    pb.schedule = "none"
    pb.save()
    c_pk = c.pk
    c.delete()
    result = schedules_sync()

    rows = _backup_schedules()
    assert set(rows) == {f"backup: {a.domain}"}
    new = rows[f"backup: {a.domain}"]
    assert new.pk == old.pk and new.cron == "15 4 * * *"
    assert (timezone.localtime(new.next_run).hour, new.next_run.minute) == (4, 15)
    assert result["updated"] == [f"backup: {a.domain}"]
    assert set(result["removed"]) == {f"backup: {b.domain}", f"backup: {c.domain}"}
    assert not Schedule.objects.filter(func=schedules.BACKUP_FUNC, args=repr(c_pk)).exists()

    # A hand-made duplicate is reduced to one; the global policy turning to "none" unschedules its customers.
    Schedule.objects.create(name="dup", func=schedules.BACKUP_FUNC, args=repr(a.pk),
                            schedule_type=Schedule.CRON, cron="0 0 * * *")
    pa.delete()
    gp = global_policy()
    gp.schedule = "none"
    gp.save()
    schedules_sync()
    assert _backup_schedules() == {}


@pytest.mark.django_db
def test_a_bad_cron_expression_is_refused_by_name_and_the_others_are_still_synced(make_customer):
    global_policy()
    good, bad = make_customer(), make_customer()
    _policy(bad, "cron", cron="61 * * * *")
    with pytest.raises(ScheduleError) as info:
        schedules_sync()
    assert bad.domain in str(info.value) and "'61 * * * *'" in str(info.value)
    assert set(_backup_schedules()) == {f"backup: {good.domain}"}

    out = io.StringIO()
    with pytest.raises(CommandError) as exit_info:
        call_command("backup_schedules", "--json", stdout=out)
    assert exit_info.value.returncode == 1
    doc = json.loads(out.getvalue())
    assert "61 * * * *" in doc["errors"][bad.domain]
    assert {s["customer"] for s in doc["schedules"] if s["customer"]} == {good.domain}

    for expr in ("", "not a cron", "0 0 * * * *", "0 0 31 2 *"):
        with pytest.raises(ScheduleError):
            schedules.validate_cron(expr)
    assert schedules.validate_cron("@daily") == "@daily"


@pytest.mark.django_db
def test_backup_schedules_command_lists_what_it_synced(make_customer):
    customer = make_customer()
    global_policy()
    out = io.StringIO()
    call_command("backup_schedules", "--json", stdout=out)
    doc = json.loads(out.getvalue())
    mine = [s for s in doc["schedules"] if s["customer"] == customer.domain]
    assert len(mine) == 1 and mine[0]["name"] == f"backup: {customer.domain}" and mine[0]["type"] == "Cron"
    assert f"backup: {customer.domain}" in doc["created"]
    text = io.StringIO()
    call_command("backup_schedules", stdout=text)
    assert f"backup: {customer.domain}" in text.getvalue() and "0 created" in text.getvalue()


def test_allowed_age_is_one_and_a_half_intervals_plus_fifteen_minutes():
    assert allowed_age(BackupPolicy(schedule="hourly")) == timedelta(hours=1, minutes=45)
    assert allowed_age(BackupPolicy(schedule="daily")) == timedelta(hours=36, minutes=15)
    assert allowed_age(BackupPolicy(schedule="none")) is None
    weekdays = BackupPolicy(schedule="cron", cron="0 2 * * 1-5")
    tuesday = datetime(2025, 6, 3, 10, 0, tzinfo=UTC)
    monday = datetime(2025, 6, 2, 10, 0, tzinfo=UTC)
    assert allowed_age(weekdays, tuesday) == timedelta(hours=36, minutes=15)  # Mon 02:00 → Tue 02:00
    assert allowed_age(weekdays, monday) == timedelta(days=4, hours=12, minutes=15)  # Fri 02:00 → Mon 02:00


# --- a real worker fires the schedule ----------------------------------------------------
def test_a_due_schedule_fires_in_a_real_worker_and_a_second_firing_during_the_backup_is_skipped(
        make_customer, customer_root, start_worker):
    (customer_root / "backend").mkdir(exist_ok=True)
    (customer_root / "backend" / "media.bin").write_bytes(os.urandom(3_000_000))
    customer = make_customer()
    global_policy()
    # 0.4 MB/s: the backup stays running for several seconds, long enough for a second firing.
    _policy(customer, "hourly", compression="none", bandwidth_limit_mbps=0.4)
    schedules_sync()
    name = f"backup: {customer.domain}"
    Schedule.objects.filter(name=name).update(next_run=timezone.now() - timedelta(minutes=1))

    # django-q2's scheduler runs inside qcluster's guard loop every 30 s; Kasa's qcluster also fires what is due
    # right after the start (operations/management/commands/qcluster.py), with the ORM broker as with Redis.
    worker = start_worker()
    try:
        run = wait_until(lambda: Run.objects.filter(customer=customer, kind=Run.Kind.BACKUP,
                                                    status=Run.Status.RUNNING).first(),
                         timeout=90, interval=0.2, what="the schedule to start a backup")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nworker log:\n{worker.output()[-5000:]}") from None
    assert run.requested_via == "schedule" and run.params["trigger"] == "schedule"
    assert Schedule.objects.get(name=name).next_run > timezone.now()  # moved on to the next hour

    # The schedule firing again while that backup runs: skipped, no second run.
    assert scheduled_backup(customer.pk).startswith("skipped: previous backup still running")
    assert Run.objects.filter(customer=customer).count() == 1
    assert Run.objects.get(pk=run.pk).status == Run.Status.RUNNING  # it really was still running

    run = wait_for_run(run.pk, timeout=120)
    assert run.status == "succeeded", run.error
    bk = Backup.objects.get(run=run)
    assert bk.status == "succeeded" and bk.trigger == "schedule" and bk.requested_by is None
    assert Run.objects.filter(customer=customer).count() == 1
    task = Success.objects.filter(group=name).first()
    assert task and task.func == "backups.tasks.scheduled_backup" and task.result == f"queued run #{run.pk}"


@pytest.mark.django_db(transaction=True)  # the task closes its connections, as in a worker
def test_scheduled_backup_of_a_deleted_or_unscheduled_customer_does_nothing(make_customer):
    customer = make_customer()
    _policy(customer, "none")
    assert scheduled_backup(customer.pk) == "skipped: not scheduled"
    assert scheduled_backup(10**9) == "skipped: customer deleted"
    assert not Run.objects.filter(customer=customer).exists()


@pytest.mark.django_db
def test_saving_a_policy_in_the_admin_updates_its_schedule(make_customer, admin_client):
    customer = make_customer()
    global_policy()
    form = {"customer": customer.pk, "schedule": "cron", "cron": "45 1 * * *", "scope": "full", "compression": "zstd",
            "encrypt": "on", "target": default_target().pk, "keep_last": 5, "keep_daily": 0, "keep_weekly": 0,
            "keep_monthly": 0, "keep_verified": 0, "excludes": "[]", "notify_emails": "", "webhook_url": "",
            "verify_schedule": "weekly", "full_every_days": 7}
    resp = admin_client.post("/backups/backuppolicy/add/", form)
    assert resp.status_code == 302, resp.content.decode()[:3000]
    assert _backup_schedules()[f"backup: {customer.domain}"].cron == "45 1 * * *"
    assert Schedule.objects.filter(name=f"verify: {customer.domain}", func="backups.tasks.scheduled_verify").exists()

    policy = BackupPolicy.objects.get(customer=customer)
    resp = admin_client.post(f"/backups/backuppolicy/{policy.pk}/change/", {**form, "cron": "99 1 * * *"})
    assert resp.status_code == 200  # the form is refused, nothing saved
    assert "invalid cron expression &#x27;99 1 * * *&#x27;" in resp.content.decode()
    policy.refresh_from_db()
    assert policy.cron == "45 1 * * *"
    assert _backup_schedules()[f"backup: {customer.domain}"].cron == "45 1 * * *"  # the last good one stays
