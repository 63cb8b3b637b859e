"""django-q2 entry points for backups. Each receives primary keys only and calls a service.

A scheduled backup only *starts* a run (`backup_start(..., enqueue=True)`):
the run is then executed by `operations.tasks.execute_run`, exactly like
"Back up now" in the admin or `manage.py backup --enqueue`. One path for every
backup means one place for redelivery handling (a run found running is failed,
never repeated), the per-customer lock and the task timeout; and the
scheduler's task ends in milliseconds instead of holding a worker for hours.
"""

from __future__ import annotations

import logging

from customers.models import Customer
from operations.context import close_db_after
from operations.models import Run
from operations.services import OperationRefused

from .models import Backup, BackupPolicy
from .notify import missed_backups_check
from .schedules import schedules_sync
from .services import BackupInputError, backup_start, policy_for, verify_start

log = logging.getLogger(__name__)


@close_db_after
def scheduled_backup(customer_id: int, slot: str | None = None) -> str:
    """`slot`: the schedule's due time (django-q2 passes it, `intended_date_kwarg`), the idempotency key of this
    firing. django-q2's scheduler claims a due schedule under SELECT … FOR UPDATE and moves it on in the same
    transaction, so several worker clusters fire it once; should it ever fire twice all the same, the second finds
    the run this slot started (its params) and starts none — while that run is active, the one-active-backup
    constraint refuses it too."""
    customer = Customer.objects.filter(pk=customer_id).first()
    if customer is None:
        log.warning("scheduled backup: customer %s no longer exists (its schedule goes at the next sync)",
                    customer_id)
        return "skipped: customer deleted"
    if customer.status == Customer.Status.DISABLED:
        log.info("scheduled backup of %s skipped: customer disabled", customer)
        return "skipped: customer disabled"
    if policy_for(customer).schedule == BackupPolicy.Schedule.NONE:
        log.info("scheduled backup of %s skipped: its policy is no longer scheduled", customer)
        return "skipped: not scheduled"
    if slot:
        fired = (Run.objects.filter(customer=customer, kind=Run.Kind.BACKUP, params__schedule_slot=slot)
                 .values_list("pk", flat=True).first())
        if fired is not None:
            log.warning("scheduled backup of %s for %s skipped: this slot already started run #%s", customer, slot,
                        fired)
            return f"skipped: slot {slot} already started run #{fired}"
    try:
        run = backup_start(customer, via="schedule", trigger=Backup.Trigger.SCHEDULE, enqueue=True,
                           schedule_slot=slot or "")
    except OperationRefused as exc:
        # A backup that outlasts its schedule (or any other mutating run) is never doubled.
        log.warning("scheduled backup of %s skipped: previous backup still running (%s)", customer, exc)
        return f"skipped: previous backup still running ({exc})"
    except BackupInputError as exc:
        # A misconfigured policy (disabled target, no keys…): nothing starts; the missed-backup
        # check alerts the policy's recipients when the lapse exceeds what the schedule allows.
        log.error("scheduled backup of %s not started: %s", customer, exc)
        return f"not started: {exc}"
    log.info("scheduled backup of %s queued as run #%s", customer, run.pk)
    return f"queued run #{run.pk}"


@close_db_after
def check_missed_backups() -> dict:
    try:
        # Reconcile first: customers added or deleted since the last sync get (or lose) their schedule.
        schedules_sync(strict=False)
    except Exception:
        log.exception("backup schedule sync failed; checking missed backups anyway")
    return missed_backups_check()


@close_db_after
def scheduled_verify(customer_id: int) -> str:
    """Drill the customer's newest successful backup (a failure flags that backup and alerts)."""
    customer = Customer.objects.filter(pk=customer_id).first()
    if customer is None or customer.status == Customer.Status.DISABLED:
        return "skipped: customer deleted or disabled"
    newest = (Backup.objects.filter(customer=customer, status=Backup.Status.SUCCEEDED)
              .order_by("-finished_at").first())
    if newest is None:
        log.warning("scheduled verification of %s skipped: no successful backup yet", customer)
        return "skipped: no successful backup"
    try:
        run = verify_start(newest, via="schedule", enqueue=True)
    except (OperationRefused, BackupInputError) as exc:
        log.warning("scheduled verification of %s not started: %s", customer, exc)
        return f"not started: {exc}"
    return f"queued run #{run.pk} (backup #{newest.pk})"
