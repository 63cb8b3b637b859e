"""Backup schedules: django-q2 Schedule rows kept equal to every customer's effective policy.

`schedules_sync()` is a reconciliation: it reads all customers and policies,
and creates, updates or deletes Schedule rows until there is exactly one
schedule `backup: <domain>` per scheduled customer (func
`backups.tasks.scheduled_backup`, args = the customer's pk), plus the
five-minute missed-backup check. It is idempotent and cheap (a handful of
queries for any number of customers), so it is called after a policy is saved
in the admin, by `kasa_setup`, by `manage.py backup_schedules` and at the
start of every missed-backup check (which is how new and deleted customers are
picked up within five minutes).

Every schedule is a cron expression (Schedule.CRON), presets included: the
preset's minute, hour, weekday or day of month are derived from a hash of the
domain, so 500 daily customers spread over the night window instead of all
starting at 02:00, and the same customer always gets the same slot.
"""

from __future__ import annotations

import ast
import hashlib
import logging
from datetime import datetime, timedelta

from croniter import croniter
from django.db import transaction
from django.utils import timezone
from django_q.models import Schedule

from customers.models import Customer

from .cron import ScheduleError, validate_cron  # noqa: F401 (ScheduleError: part of this module's API)
from .models import BackupPolicy
from .services import global_policy

log = logging.getLogger(__name__)

BACKUP_FUNC = "backups.tasks.scheduled_backup"
VERIFY_FUNC = "backups.tasks.scheduled_verify"
VERIFY_PREFIX = "verify: "
# Drills run in the morning window, after the night's backups (06:00-11:59).
VERIFY_HOUR_OFFSET = 6
MISSED_FUNC = "backups.tasks.check_missed_backups"
MISSED_NAME = "kasa: check missed backups"
MISSED_EVERY_MINUTES = 5
NAME_PREFIX = "backup: "
# Daily, weekly and monthly backups start between 00:00 and 05:59 (TIME_ZONE).
NIGHT_HOURS = 6

# Nominal interval of each preset: the missed-backup alert allows 1.5 × this + 15 min.
PRESET_INTERVALS = {
    BackupPolicy.Schedule.HOURLY: timedelta(hours=1),
    BackupPolicy.Schedule.DAILY: timedelta(days=1),
    BackupPolicy.Schedule.WEEKLY: timedelta(weeks=1),
    BackupPolicy.Schedule.MONTHLY: timedelta(days=31),
}
GRACE = timedelta(minutes=15)


def _spread(domain: str) -> int:
    return int.from_bytes(hashlib.sha256(domain.encode()).digest()[:8], "big")


def cron_for(policy: BackupPolicy, domain: str) -> str | None:
    """The cron expression a customer's backups run on, or None when not scheduled."""
    kind = policy.schedule
    if kind == BackupPolicy.Schedule.NONE:
        return None
    if kind == BackupPolicy.Schedule.CRON:
        return validate_cron(policy.cron)
    h = _spread(domain)
    minute, hour = h % 60, (h // 60) % NIGHT_HOURS
    if kind == BackupPolicy.Schedule.HOURLY:
        return f"{minute} * * * *"
    if kind == BackupPolicy.Schedule.DAILY:
        return f"{minute} {hour} * * *"
    if kind == BackupPolicy.Schedule.WEEKLY:
        return f"{minute} {hour} * * {(h // 360) % 7}"
    if kind == BackupPolicy.Schedule.MONTHLY:
        return f"{minute} {hour} {(h // 2520) % 28 + 1} * *"
    raise ScheduleError(f"unknown schedule {kind!r}")


def verify_cron_for(policy: BackupPolicy, domain: str) -> str | None:
    """The cron expression of a customer's verification drills, or None when not scheduled."""
    kind = policy.verify_schedule
    if kind == BackupPolicy.Schedule.NONE:
        return None
    h = _spread("verify:" + domain)
    minute, hour = h % 60, (h // 60) % NIGHT_HOURS + VERIFY_HOUR_OFFSET
    return {
        BackupPolicy.Schedule.HOURLY: f"{minute} * * * *",
        BackupPolicy.Schedule.DAILY: f"{minute} {hour} * * *",
        BackupPolicy.Schedule.WEEKLY: f"{minute} {hour} * * {(h // 360) % 7}",
        BackupPolicy.Schedule.MONTHLY: f"{minute} {hour} {(h // 2520) % 28 + 1} * *",
    }[kind]


def allowed_age(policy: BackupPolicy, now: datetime | None = None) -> timedelta | None:
    """How old the last successful backup may be before it counts as missed; None: not scheduled.

    Presets: 1.5 × the interval + 15 min. Cron: 1.5 × the gap between the
    two most recent fire times before `now` + 15 min (so '0 2 * * 1-5' allows
    more over a weekend than on a Tuesday).
    """
    if policy.schedule == BackupPolicy.Schedule.NONE:
        return None
    if policy.schedule == BackupPolicy.Schedule.CRON:
        it = croniter(validate_cron(policy.cron), timezone.localtime(now or timezone.now()))
        last = it.get_prev(datetime)
        before = it.get_prev(datetime)
        interval = last - before
    else:
        interval = PRESET_INTERVALS[policy.schedule]
    return interval * 1.5 + GRACE


def next_fire(cron: str, after: datetime | None = None) -> datetime:
    """Next fire time, computed as django-q2 does (croniter in the local TIME_ZONE)."""
    return croniter(cron, timezone.localtime(after or timezone.now())).get_next(datetime)


def schedule_name(domain: str) -> str:
    return f"{NAME_PREFIX}{domain}"


def _customer_id_of(schedule: Schedule) -> int | None:
    try:
        args = ast.literal_eval(schedule.args or "")
    except (SyntaxError, ValueError):
        return None
    if isinstance(args, tuple):
        args = args[0] if len(args) == 1 else None
    return args if isinstance(args, int) else None


def effective_policies(customers) -> dict[int, BackupPolicy]:
    """customer pk → its own policy or the global one, in two queries."""

    fallback = global_policy()
    own = {p.customer_id: p for p in BackupPolicy.objects.filter(customer__in=customers)}
    return {c.pk: own.get(c.pk, fallback) for c in customers}


def scheduled_customers():
    """Customers that get scheduled backups: every one not disabled."""
    return Customer.objects.exclude(status=Customer.Status.DISABLED).order_by("domain")


def schedules_sync(*, strict: bool = True) -> dict:
    """Make the Schedule rows match every customer's effective policy.

    Returns {"created": [names], "updated": [names], "removed": [names],
    "unchanged": n, "errors": {domain: message}}. A customer whose policy has a
    bad cron expression keeps whatever schedule it had; the others are synced
    all the same, and then (strict=True) ScheduleError names every bad one.
    """
    result = {"created": [], "updated": [], "removed": [], "unchanged": 0, "errors": {}}
    now = timezone.now()
    with transaction.atomic():

        global_policy()
        # One sync at a time: the global policy row is the mutex (a no-op lock on SQLite, whose writers queue).
        BackupPolicy.objects.select_for_update().filter(customer__isnull=True).first()

        customers = list(scheduled_customers())
        policies = effective_policies(customers)
        for func, prefix, cron_of in ((BACKUP_FUNC, NAME_PREFIX, cron_for),
                                      (VERIFY_FUNC, VERIFY_PREFIX, verify_cron_for)):
            _sync_func(func, prefix, cron_of, customers, policies, result, now)

        _sync_missed_check(result)

    for name in result["created"] + result["updated"] + result["removed"]:
        log.info("backup schedule %s: %s", "removed" if name in result["removed"] else "synced", name)
    if strict and result["errors"]:
        raise ScheduleError("; ".join(result["errors"].values()))
    return result


def _sync_func(func: str, prefix: str, cron_of, customers, policies, result: dict, now) -> None:
    """One Schedule row `<prefix><domain>` calling `func(customer pk)` per customer whose policy asks for it."""
    existing: dict[int, list[Schedule]] = {}
    for s in Schedule.objects.select_for_update().filter(func=func).order_by("pk"):
        existing.setdefault(_customer_id_of(s), []).append(s)

    for customer in customers:
        rows = existing.pop(customer.pk, [])
        try:
            cron = cron_of(policies[customer.pk], customer.domain)
        except ScheduleError as exc:
            result["errors"][customer.domain] = f"{customer.domain}: {exc}"
            continue
        if cron is None:
            for s in rows:
                result["removed"].append(s.name)
                s.delete()
            continue
        keep, extra = (rows[0], rows[1:]) if rows else (None, [])
        for s in extra:  # duplicates (a race before this lock existed, or hand-made): keep one
            result["removed"].append(s.name)
            s.delete()
        wanted = {"name": f"{prefix}{customer.domain}", "func": func, "args": repr(customer.pk),
                  "kwargs": None, "schedule_type": Schedule.CRON, "cron": cron, "repeats": -1, "cluster": None,
                  # A backup's due time goes to the task as its idempotency key (backups.tasks.scheduled_backup).
                  "intended_date_kwarg": "slot" if func == BACKUP_FUNC else None}
        if keep is None:
            Schedule.objects.create(**wanted, next_run=next_fire(cron, now))
            result["created"].append(wanted["name"])
            continue
        changed = {k: v for k, v in wanted.items() if getattr(keep, k) != v}
        if not changed:
            result["unchanged"] += 1
            continue
        for k, v in changed.items():
            setattr(keep, k, v)
        if "cron" in changed or "schedule_type" in changed or keep.next_run is None:
            keep.next_run = next_fire(cron, now)
        keep.save()
        result["updated"].append(wanted["name"])

    # Schedules of customers that were deleted or disabled, or whose args make no sense.
    for rows in existing.values():
        for s in rows:
            result["removed"].append(s.name)
            s.delete()


def _sync_missed_check(result: dict) -> None:
    rows = list(Schedule.objects.filter(func=MISSED_FUNC).order_by("pk"))
    for s in rows[1:]:
        s.delete()
    wanted = {"name": MISSED_NAME, "schedule_type": Schedule.MINUTES, "minutes": MISSED_EVERY_MINUTES,
              "repeats": -1, "args": None, "kwargs": None, "cluster": None}
    if not rows:
        Schedule.objects.create(func=MISSED_FUNC, **wanted)
        result["created"].append(MISSED_NAME)
        return
    s = rows[0]
    changed = {k: v for k, v in wanted.items() if getattr(s, k) != v}
    if changed:
        for k, v in changed.items():
            setattr(s, k, v)
        s.save()
        result["updated"].append(MISSED_NAME)
    else:
        result["unchanged"] += 1


def schedules_document() -> list[dict]:
    """Every backup-related schedule, as `manage.py backup_schedules --json` prints them."""
    customers = {c.pk: c for c in Customer.objects.all()}
    docs = []
    for s in Schedule.objects.filter(func__in=[BACKUP_FUNC, VERIFY_FUNC, MISSED_FUNC]).order_by("name"):
        customer = customers.get(_customer_id_of(s)) if s.func in (BACKUP_FUNC, VERIFY_FUNC) else None
        docs.append({
            "name": s.name, "func": s.func, "customer": customer.domain if customer else None,
            "type": str(s.get_schedule_type_display()), "cron": s.cron, "minutes": s.minutes, "next_run": s.next_run,
        })
    return docs
