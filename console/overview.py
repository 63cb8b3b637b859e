"""The fleet overview that opens the admin index: how many customers are in each state, who needs someone first,
and what failed lately — for the customers the user may see (Customer.objects.visible_to).

Every figure is computed in the database (backups.recovery.with_recovery plus the upgrade states below), each
customer's once: four queries whatever the number of customers, backups or runs (the global policy's targets;
the counts and the worst customers' ids in one pass; those customers; the recent failures) and one for the
active rollouts.

States (a customer counts in each one that applies; "healthy" is none of them):
- outside RPO: no verified backup within the RPO target (never verified included);
- last backup failed: the newest finished backup failed;
- upgrading: an upgrade or rollback is pending or running;
- quarantined: an upgrade could not be put back and no operator has resolved it yet;
- no immutable copy: the policy requires one (require_immutable) and the newest verified backup has no copy
  under an Object Lock still in force (backups.recovery: 3-2-1 at a glance). Like outside RTO it is a target
  missed rather than data lost: it needs attention but does not make the customer unhealthy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from django.db import connections
from django.db.models import Count, Exists, OuterRef, Q
from django.utils import timezone

from backups.models import Backup
from backups.recovery import NO_IMMUTABLE_TEXT, copies_text, global_targets, with_recovery
from customers.models import Customer
from engines.humanize import human_duration, human_time
from operations.models import Run
from rollouts.models import Rollout, RolloutTarget
from rollouts.selectors import visible_rollouts
from upgrades.models import Upgrade

ATTENTION_LIMIT = 15  # rows of "needs attention"; the count says how many there are in all
FAILURES_LIMIT = 10
FAILURES_DAYS = 7
ROLLOUTS_LIMIT = 10

# The states, as SQL over the columns of with_state()'s query (portable: PostgreSQL and SQLite). They are applied
# outside that query, so each customer's figures are computed once (a condition inside it would repeat them).
STATES = {
    "outside_rpo": "(f.last_verified IS NULL OR f.last_verified < f.rpo_cutoff)",
    "last_failed": "(f.last_status = 'failed')",
    "upgrading": "(f.upgrading)",
    "quarantined": "(f.quarantined)",
    "never_verified": "(f.last_verified IS NULL)",
    "outside_rto": "(f.rto_measured IS NOT NULL AND f.rto_measured > f.rto_limit)",
    "no_immutable": "(f.immutable_required AND f.copies_immutable = 0)",
}
HEALTHY = "NOT ({outside_rpo} OR {last_failed} OR {upgrading} OR {quarantined})".format(**STATES)
NEEDS_ATTENTION = "({quarantined} OR {last_failed} OR {outside_rpo} OR {outside_rto} OR {no_immutable})".format(
    **STATES)
# Worst first: an operator must act on a quarantine; a failed backup and a lapsed RPO put data at risk; a slow
# restore or a missing immutable copy is a target missed, not data lost. Then the longest without a restore
# point, then by name.
SEVERITY = ("CASE WHEN {quarantined} THEN 4 WHEN {last_failed} THEN 3 WHEN {outside_rpo} THEN 2 "
            "WHEN {outside_rto} THEN 1 WHEN {no_immutable} THEN 1 ELSE 0 END").format(**STATES)
COLUMNS = ("id", "domain", "last_verified", "last_status", "rto_measured", "rpo_cutoff", "rto_limit", "upgrading",
           "quarantined", "copies_immutable", "immutable_required")


@dataclass
class Overview:
    customers: int
    counts: dict[str, int]  # healthy and each of STATES
    attention: list  # customers annotated by with_state(), worst first, at most ATTENTION_LIMIT
    attention_total: int
    failures: list  # failed runs of the last FAILURES_DAYS days, newest first, at most FAILURES_LIMIT
    failures_days: int = FAILURES_DAYS
    rollouts: list = field(default_factory=list)  # active rollouts the user may see, newest first


def active_rollouts(user, limit: int = ROLLOUTS_LIMIT) -> list[Rollout]:
    """The active rollouts whose every customer the user may see, each with `total` and `upgraded` (one query)."""
    qs = visible_rollouts(user, Rollout.objects.filter(status__in=Rollout.ACTIVE)).select_related("release")
    qs = qs.annotate(total=Count("targets"),
                     upgraded=Count("targets", filter=Q(targets__state=RolloutTarget.State.UPGRADED)))
    return list(qs.order_by("-created_at", "-id")[:limit])


def with_state(customers, defaults=None):
    """with_recovery() plus `upgrading` and `quarantined` (booleans)."""
    active = Upgrade.objects.filter(customer=OuterRef("pk"), status__in=[Upgrade.Status.PENDING,
                                                                           Upgrade.Status.RUNNING])
    quarantine = Upgrade.objects.unresolved_quarantine().filter(customer=OuterRef("pk"))
    return with_recovery(customers, defaults=defaults).annotate(upgrading=Exists(active),
                                                                quarantined=Exists(quarantine))


def _over(states, sql: str, extra=()) -> list[tuple]:
    """Run `sql` with {f} standing for with_state()'s query as a derived table."""
    inner, params = states.order_by().values(*COLUMNS).query.sql_with_params()
    connection = connections[states.db]
    # OFFSET 0 keeps the derived table whole: otherwise PostgreSQL pulls it up and every reference to a column
    # repeats the subquery behind it. SQLite wants a LIMIT before an OFFSET.
    fence = "OFFSET 0" if connection.vendor == "postgresql" else "LIMIT -1 OFFSET 0"
    with connection.cursor() as cur:
        cur.execute(sql.format(f=f"({inner} {fence}) f"), (*params, *extra))
        return cur.fetchall()


def overview(user) -> Overview:
    visible = Customer.objects.visible_to(user)
    defaults = global_targets()
    states = with_state(visible, defaults)
    names = ["healthy", *STATES, "attention"]
    conditions = [HEALTHY, *STATES.values(), NEEDS_ATTENTION]
    # One pass: the counts are window sums over every visible customer, computed before the ORDER BY and LIMIT
    # pick the worst; a customer with severity 0 needs nothing (it only fills a short list).
    sums = ", ".join(f"SUM(CASE WHEN {c} THEN 1 ELSE 0 END) OVER ()" for c in conditions)
    rows = _over(states, f"SELECT f.id, {SEVERITY}, COUNT(*) OVER (), {sums} FROM {{f}} "
                         f"ORDER BY {SEVERITY} DESC, f.last_verified IS NOT NULL, f.last_verified, f.domain LIMIT %s",
                 (ATTENTION_LIMIT,))
    total = rows[0][2] if rows else 0
    counts = dict(zip(names, rows[0][3:] if rows else [0] * len(names), strict=True))
    ids = [r[0] for r in rows if r[1] > 0]
    rank = {pk: i for i, pk in enumerate(ids)}
    attention = sorted(with_state(Customer.objects.filter(pk__in=ids), defaults).select_related("team"),
                       key=lambda c: rank[c.pk])
    now = timezone.now()
    for c in attention:
        c.outside_rpo = c.last_verified is None or c.last_verified < c.rpo_cutoff
        c.last_failed = c.last_status == Backup.Status.FAILED
        c.outside_rto = c.rto_measured is not None and c.rto_measured > c.rto_limit
        c.rpo_text = (human_duration((now - c.last_verified).total_seconds()) if c.last_verified
                      else "never verified")
        c.rpo_target_text = human_duration(c.rpo_hours * 3600)
        c.rto_text = human_duration(c.rto_measured.total_seconds()) if c.rto_measured is not None else "—"
        c.rto_target_text = human_duration(c.rto_minutes * 60)
        c.no_immutable = bool(c.immutable_required) and not c.copies_immutable
        c.copies_text = copies_text(c.last_verified, c.copies, c.copies_offsite, c.copies_immutable)
        c.problems = [label for flag, label in (
            ("quarantined", "quarantined"), ("last_failed", "last backup failed"),
            ("outside_rpo", "outside RPO"), ("outside_rto", "outside RTO"), ("no_immutable", NO_IMMUTABLE_TEXT),
            ("upgrading", "upgrading"))
            if getattr(c, flag)]
    since = now - timedelta(days=FAILURES_DAYS)
    failures = list(Run.objects.filter(customer__in=visible, status=Run.Status.FAILED, finished_at__gte=since)
                    .select_related("customer").order_by("-finished_at")[:FAILURES_LIMIT])
    for run in failures:
        run.finished_text = human_time(run.finished_at)
        error = (run.error or "").strip()
        run.error_line = error.splitlines()[0][:160] if error else ""
    attention_total = counts.pop("attention")
    return Overview(customers=total, counts=counts, attention=attention, attention_total=attention_total,
                    failures=failures, rollouts=active_rollouts(user))
