"""Recovery objectives per customer: how much could we lose (RPO), how long would it take (RTO).

Current RPO is the age of the newest backup that succeeded AND passed a
verification drill: an unverified backup is a hope, not a restore point.
Measured RTO is the duration (started → finished) of the newest successful WHOLE
recovery of the customer: a restore in place of everything the backup holds, or
a verification drill (which restores the whole backup into scratch). Partial
restores (--only), copies elsewhere (--to-root, --to-database), upgrades,
rollbacks and failed or cancelled runs say nothing about getting the whole
customer back, so they never change it.
A handful of grouped queries serve the whole fleet (admin index, metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Max, Q, Sum
from django.utils import timezone

from customers.models import Customer
from operations.models import Run

from .models import Backup, BackupPolicy


@dataclass
class Recovery:
    customer: Customer
    rpo_target: timedelta
    rto_target: timedelta
    last_success: datetime | None
    last_verified: datetime | None  # finished_at of the newest verified backup
    last_status: str | None  # status of the newest finished backup
    never_verified: bool
    rto_measured: float | None  # seconds
    storage: int  # bytes of succeeded backups (primary copies)

    @property
    def rpo_current(self) -> timedelta | None:
        return timezone.now() - self.last_verified if self.last_verified else None

    @property
    def outside_rpo(self) -> bool:
        current = self.rpo_current
        return current is None or current > self.rpo_target

    @property
    def outside_rto(self) -> bool:
        return self.rto_measured is not None and self.rto_measured > self.rto_target.total_seconds()

    @property
    def last_failed(self) -> bool:
        return self.last_status == Backup.Status.FAILED


def is_whole_recovery(run: Run) -> bool:
    """Does this run measure RTO? A drill, or a restore of the whole backup in place (no --only, no copy)."""
    if run.kind == Run.Kind.VERIFY:
        return True
    if run.kind != Run.Kind.RESTORE:
        return False
    p = run.params or {}
    return not (p.get("only") or p.get("to_root") or p.get("to_databases"))


def targets(policy: BackupPolicy | None) -> tuple[timedelta, timedelta]:
    rpo = policy.rpo_hours if policy and policy.rpo_hours else settings.KASA_RPO_HOURS
    rto = policy.rto_minutes if policy and policy.rto_minutes else settings.KASA_RTO_MINUTES
    return timedelta(hours=rpo), timedelta(minutes=rto)


def fleet(customers=None) -> list[Recovery]:
    from .schedules import effective_policies

    customers = list(customers if customers is not None else Customer.objects.all())
    ids = [c.pk for c in customers]
    policies = effective_policies(customers)
    done = Backup.objects.filter(customer_id__in=ids, status=Backup.Status.SUCCEEDED).order_by()
    per = {r["customer_id"]: r for r in done.values("customer_id").annotate(
        last=Max("finished_at"), size=Sum("size"),
        verified=Max("finished_at", filter=Q(verify_status=Backup.VerifyStatus.PASSED)))}
    last_status = {}
    for row in (Backup.objects.filter(customer_id__in=ids, status__in=[Backup.Status.SUCCEEDED,
                                                                        Backup.Status.FAILED])
                .order_by("customer_id", "-finished_at").values("customer_id", "status")):
        last_status.setdefault(row["customer_id"], row["status"])
    rto = {}
    for run in (Run.objects.filter(customer_id__in=ids, status=Run.Status.SUCCEEDED, started_at__isnull=False,
                                   finished_at__isnull=False, kind__in=[Run.Kind.RESTORE, Run.Kind.VERIFY])
                .order_by("customer_id", "-finished_at").only("customer_id", "kind", "params", "started_at",
                                                              "finished_at")):
        if run.customer_id not in rto and is_whole_recovery(run):
            rto[run.customer_id] = (run.finished_at - run.started_at).total_seconds()
    out = []
    for c in customers:
        row = per.get(c.pk, {})
        rpo_t, rto_t = targets(policies.get(c.pk))
        out.append(Recovery(customer=c, rpo_target=rpo_t, rto_target=rto_t, last_success=row.get("last"),
                            last_verified=row.get("verified"), last_status=last_status.get(c.pk),
                            never_verified=row.get("verified") is None, rto_measured=rto.get(c.pk),
                            storage=row.get("size") or 0))
    return out


def summary(rows: list[Recovery]) -> dict:
    return {
        "customers": len(rows),
        "outside_rpo": [r for r in rows if r.outside_rpo],
        "outside_rto": [r for r in rows if r.outside_rto],
        "last_failed": [r for r in rows if r.last_failed],
        "never_verified": [r for r in rows if r.never_verified],
        "storage": sum(r.storage for r in rows),
    }
