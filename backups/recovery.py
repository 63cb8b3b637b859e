"""Recovery objectives per customer: how much could we lose (RPO), how long would it take (RTO).

Current RPO is the age of the newest backup that succeeded AND passed a
verification drill: an unverified backup is a hope, not a restore point.
Measured RTO is the duration of the newest successful whole recovery of the
customer (a drill, or a restore of everything in place: WHOLE_RECOVERY) — the
closest evidence we have of how long getting it back takes.
3-2-1 at a glance: how many copies the newest verified backup has (the primary
on Backup.target plus each succeeded BackupCopy), how many are off this host
(not on a local folder target) and how many are immutable (written under an
Object Lock that still holds). A policy with require_immutable flags the
customer when none is.
The figures are computed in the database, one query for any number of
customers (`with_recovery`): the admin index, the customer page and /metrics
read them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from django.conf import settings
from django.db import connections
from django.db.models import (
    BigIntegerField,
    BooleanField,
    Case,
    Count,
    DateTimeField,
    DurationField,
    ExpressionWrapper,
    F,
    FloatField,
    IntegerField,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Cast, Coalesce, NullIf
from django.utils import timezone

from customers.models import Customer
from operations.models import Run

from .models import Backup, BackupCopy, BackupPolicy, StorageTally, StorageTarget


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
    # 3-2-1 of the newest verified backup (0 without one): its copies, those off this host, those immutable.
    copies: int = 0
    copies_offsite: int = 0
    copies_immutable: int = 0
    immutable_required: bool = False  # the effective policy's require_immutable

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

    @property
    def no_immutable(self) -> bool:
        """The policy requires an immutable copy and the newest verified backup has none (or there is none)."""
        return self.immutable_required and not self.copies_immutable

    @property
    def copies_text(self) -> str:
        return copies_text(self.last_verified, self.copies, self.copies_offsite, self.copies_immutable)


NO_IMMUTABLE_TEXT = "no immutable copy (policy requires one)"


def copies_text(last_verified, copies: int, offsite: int, immutable: int) -> str:
    """"2 copies · 1 off-host · 1 immutable"; "—" without a verified backup."""
    if last_verified is None:
        return "—"
    return f"{copies} cop{'y' if copies == 1 else 'ies'} · {offsite} off-host · {immutable} immutable"


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


# --- the fleet's figures, computed in the database ------------------------------------------------------------
# Each figure is a correlated subquery that reads one entry of a partial index per customer (migration
# backups 0008 and operations 0004): the cost follows the number of customers shown, never the number of
# backups or runs. Nothing is computed per customer in Python but the dataclass below.

def _empty(key: str) -> Q:
    """params has no `key`, or a JSON null, empty string, list or object there."""
    return (Q(**{f"params__{key}__isnull": True}) | Q(**{f"params__{key}": None}) | Q(**{f"params__{key}": ""})
            | Q(**{f"params__{key}": []}) | Q(**{f"params__{key}": {}}))


# The runs that measure RTO (issue 12, point 4): a drill, or a restore of the whole backup in place (no --only,
# no copy to another root, databases or customer).
WHOLE_RECOVERY = Q(kind=Run.Kind.VERIFY) | (
    Q(kind=Run.Kind.RESTORE) & _empty("only") & _empty("to_root") & _empty("to_databases") & _empty("to_customer"))


def rto_runs():
    """Successful whole recoveries with both times, any customer (filter it)."""
    return Run.objects.filter(WHOLE_RECOVERY, status=Run.Status.SUCCEEDED, kind__in=[Run.Kind.RESTORE,
                              Run.Kind.VERIFY], started_at__isnull=False, finished_at__isnull=False)


def _newest(qs, field: str):
    return Subquery(qs.filter(customer=OuterRef("pk"), finished_at__isnull=False)
                    .order_by("-finished_at").values(field)[:1])


class Defaults(NamedTuple):
    """What a customer without a policy of its own gets."""
    rpo_hours: float
    rto_minutes: float
    require_immutable: bool = False


def global_targets() -> Defaults:
    """(RPO hours, RTO minutes, require_immutable) of a customer without a policy of its own: the global policy's,
    else settings. Read only: a missing global policy is not created here."""
    policy = (BackupPolicy.objects.filter(customer__isnull=True).only("rpo_hours", "rto_minutes", "require_immutable")
              .first())
    return Defaults(policy.rpo_hours if policy and policy.rpo_hours else settings.KASA_RPO_HOURS,
                    policy.rto_minutes if policy and policy.rto_minutes else settings.KASA_RTO_MINUTES,
                    bool(policy and policy.require_immutable))


# --- 3-2-1 of the newest verified backup ---------------------------------------------------------------------
# Each figure is one more correlated subquery per customer: the same entry of backup_customer_verified as
# last_verified, and for that one backup its copies (index unique_backup_copy). A figure counts the primary
# (Backup.target, 1 when it matches) plus the succeeded BackupCopy rows that match.

OFFSITE = ~Q(target__kind=StorageTarget.Kind.LOCAL)  # S3 or SFTP: not on Kasa's own disk


def _immutable(now) -> Q:
    # Written under an Object Lock (the row's own mode, recorded at the write, or its target's) whose retention
    # has not ended: until then not even Kasa's own credentials can delete or overwrite it.
    return Q(locked_until__gt=now) & (~Q(lock_mode="") | ~Q(target__lock_mode=""))


def _copy_count(match: Q):
    copies = (BackupCopy.objects.filter(match, backup=OuterRef("pk"), status="succeeded").order_by()
              .values("backup").annotate(n=Count("pk")).values("n"))
    return Coalesce(Subquery(copies, output_field=IntegerField()), Value(0))


def _of_verified(verified, match: Q | None):
    """The newest verified backup's copies matching `match` (None: every copy), primary included."""
    primary = Value(1) if match is None else Case(When(match, then=Value(1)), default=Value(0))
    figure = verified.annotate(n=ExpressionWrapper(primary + _copy_count(match or Q()), output_field=IntegerField()))
    return Coalesce(_newest(figure, "n"), Value(0), output_field=IntegerField())


def with_recovery(customers, *, storage: bool = False, defaults: Defaults | None = None):
    """`customers` (a queryset) annotated with the recovery figures, in the database, each computed once per row:

    last_success, last_verified, last_status (of the newest finished backup), rto_measured (a duration),
    rpo_hours and rto_minutes (the effective targets), rpo_cutoff (now minus the RPO target: outside RPO is
    last_verified missing or older) and rto_limit (the RTO target as a duration: outside RTO is rto_measured
    longer); copies, copies_offsite, copies_immutable (3-2-1 of the newest verified backup, 0 without one) and
    immutable_required (the effective policy's require_immutable); with storage=True also storage (bytes of
    succeeded backups, an index-only sum per customer).
    Conditions on them: OUTSIDE_RPO, LAST_FAILED, NEVER_VERIFIED, OUTSIDE_RTO, NO_IMMUTABLE."""
    rpo_default, rto_default, immutable_default = defaults or global_targets()
    done = Backup.objects.filter(status__in=[Backup.Status.SUCCEEDED, Backup.Status.FAILED])
    succeeded = Backup.objects.filter(status=Backup.Status.SUCCEEDED)
    elapsed = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
    own = Q(backup_policy__isnull=False)
    verified = succeeded.filter(verify_status=Backup.VerifyStatus.PASSED)
    qs = customers.annotate(
        last_success=_newest(succeeded, "finished_at"),
        last_verified=_newest(verified, "finished_at"),
        copies=_of_verified(verified, None),
        copies_offsite=_of_verified(verified, OFFSITE),
        copies_immutable=_of_verified(verified, _immutable(timezone.now())),
        # The customer's own policy replaces the global one whole (backups.services.policy_for).
        immutable_required=Case(When(own, then=F("backup_policy__require_immutable")),
                                default=Value(bool(immutable_default)), output_field=BooleanField()),
        last_status=_newest(done, "status"),
        rto_measured=_newest(rto_runs().annotate(elapsed=elapsed), "elapsed"),
        rpo_hours=Coalesce(Case(When(own, then=NullIf(F("backup_policy__rpo_hours"), Value(0.0)))),
                           Value(float(rpo_default)), output_field=FloatField()),
        rto_minutes=Coalesce(Case(When(own, then=NullIf(F("backup_policy__rto_minutes"), Value(0.0)))),
                             Value(float(rto_default)), output_field=FloatField()),
    ).annotate(
        # Cast: a whole duration on SQLite (microseconds as an integer), where a float one would read as NULL.
        rpo_cutoff=ExpressionWrapper(Value(timezone.now()) - Cast(
            F("rpo_hours") * Value(timedelta(hours=1)), output_field=DurationField()), output_field=DateTimeField()),
        rto_limit=Cast(F("rto_minutes") * Value(timedelta(minutes=1)), output_field=DurationField()),
    )
    if storage:
        if connections[customers.db].vendor == "postgresql":  # kept by a trigger: one row per customer
            total = StorageTally.objects.filter(customer=OuterRef("pk")).values("bytes")[:1]
        else:
            total = (succeeded.filter(customer=OuterRef("pk")).order_by().values("customer")
                     .annotate(total=Sum("size")).values("total"))
        qs = qs.annotate(storage=Coalesce(Subquery(total), Value(0), output_field=BigIntegerField()))
    return qs


# Conditions on with_recovery()'s figures. Where they filter a query of their own, the figures' subqueries run
# again: console.overview applies them outside the query that computes the figures.
NEVER_VERIFIED = Q(last_verified__isnull=True)
OUTSIDE_RPO = Q(last_verified__isnull=True) | Q(last_verified__lt=F("rpo_cutoff"))
LAST_FAILED = Q(last_status=Backup.Status.FAILED)
OUTSIDE_RTO = Q(rto_measured__gt=F("rto_limit"))
NO_IMMUTABLE = Q(immutable_required=True, copies_immutable=0)


def fleet(customers=None) -> list[Recovery]:
    """The figures of `customers` (a queryset or an iterable of customers; None: all), by domain: one query."""
    if customers is None:
        qs = Customer.objects.all()
    elif isinstance(customers, QuerySet):
        qs = customers
    else:
        qs = Customer.objects.filter(pk__in=[c.pk for c in customers])
    out = []
    for c in with_recovery(qs.order_by("domain"), storage=True):
        out.append(Recovery(
            customer=c, rpo_target=timedelta(hours=c.rpo_hours), rto_target=timedelta(minutes=c.rto_minutes),
            last_success=c.last_success, last_verified=c.last_verified, last_status=c.last_status,
            never_verified=c.last_verified is None,
            rto_measured=c.rto_measured.total_seconds() if c.rto_measured is not None else None,
            storage=c.storage or 0, copies=c.copies, copies_offsite=c.copies_offsite,
            copies_immutable=c.copies_immutable, immutable_required=bool(c.immutable_required)))
    return out


def summary(rows: list[Recovery]) -> dict:
    return {
        "customers": len(rows),
        "outside_rpo": [r for r in rows if r.outside_rpo],
        "outside_rto": [r for r in rows if r.outside_rto],
        "last_failed": [r for r in rows if r.last_failed],
        "never_verified": [r for r in rows if r.never_verified],
        "no_immutable": [r for r in rows if r.no_immutable],
        "storage": sum(r.storage for r in rows),
    }
