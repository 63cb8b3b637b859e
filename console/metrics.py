"""Prometheus metrics computed from the control database at scrape time (served at /metrics by console.views).

Reading the database at scrape time (rather than keeping counters in memory) gives
the same numbers whichever web process answers and survives restarts. At fleet
scale nothing here reads every run or backup: run counts come from RunTally (kept
by a trigger as runs change), run durations from RunDurationTally (the histogram's
buckets, kept by a trigger the same way: a scrape reads a few rows per customer and
kind, where one grouped CASE query over the runs would read every finished run at
every scrape), recovery figures from one indexed query. Storage counters
(bytes written/read, errors) are rows of backups.models.TargetCounter, only ever
incremented where the bytes move, so deleting backups never lowers them.
A staff member sees only the customers of their teams (and their runs and queue);
the metrics token (Prometheus) and superusers see the whole fleet, and they alone
see the fleet's machinery (storage targets, workers).
"""

from __future__ import annotations

from datetime import timedelta

from django.db import connection
from django.db.models import Count, DurationField, ExpressionWrapper, F, Max, Min, Q, Sum
from django.utils import timezone
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.utils import floatToGoString

from backups.models import Backup, BackupCopy, TargetCounter
from backups.recovery import with_recovery
from customers.models import Customer
from operations.models import RUN_DURATION_BUCKETS, Run, RunDurationTally, RunTally, WorkerBeat
from rollouts.models import GateResult, Rollout
from rollouts.selectors import visible_rollouts
from upgrades.models import Upgrade

ROLLOUTS_RECENT = timedelta(days=1)  # an ended rollout is still exposed this long (its last status)


class KasaCollector:
    def __init__(self, user=None):
        self.user = user  # None: the whole fleet

    def collect(self):
        customers_qs = Customer.objects.all() if self.user is None else Customer.objects.visible_to(self.user)
        scoped = None if self.user is None else customers_qs
        runs = GaugeMetricFamily("kasa_runs", "Runs by kind and status", labels=["kind", "status"])
        sums = {}
        for kind, status, n, timed, seconds in run_counts(scoped):
            runs.add_metric([kind, status], n)
            if timed and status in Run.TERMINAL:
                sums[(kind, status)] = seconds
        yield runs
        yield duration_histogram(scoped, sums)
        yield from queue_metrics(scoped)

        customers = GaugeMetricFamily("kasa_customers", "Customers by status", labels=["status"])
        for row in customers_qs.order_by().values("status").annotate(n=Count("id")):
            customers.add_metric([row["status"]], row["n"])
        yield customers
        yield from recovery_metrics(None if self.user is None else customers_qs)
        yield version_metrics(None if self.user is None else customers_qs)
        yield from rollout_metrics(self.user)
        if self.user is None or self.user.is_superuser:
            yield from storage_metrics()
            yield worker_metrics()


def run_counts(customers=None) -> list[tuple[str, str, int, int, float]]:
    """(kind, status, runs, runs with both times, their summed seconds) of the customers' runs (None: all).
    On PostgreSQL from RunTally (kept by a trigger: a few rows per customer, whatever the number of runs);
    elsewhere by counting the runs."""
    if connection.vendor == "postgresql":
        tally = RunTally.objects.filter(runs__gt=0)
        if customers is not None:
            tally = tally.filter(customer__in=customers)
        rows = (tally.order_by("kind", "status").values("kind", "status")
                .annotate(n=Sum("runs"), t=Sum("timed"), s=Sum("seconds")))
        return [(r["kind"], r["status"], r["n"], r["t"], r["s"] or 0.0) for r in rows]
    runs = Run.objects.all() if customers is None else Run.objects.filter(customer__in=customers)
    elapsed = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
    timed = Q(started_at__isnull=False, finished_at__isnull=False)
    rows = (runs.order_by("kind", "status").values("kind", "status")
            .annotate(n=Count("id"), t=Count("id", filter=timed), s=Sum(elapsed, filter=timed)))
    return [(r["kind"], r["status"], r["n"], r["t"], r["s"].total_seconds() if r["s"] else 0.0) for r in rows]


def duration_counts(customers=None) -> dict[tuple[str, str], dict[float, int]]:
    """{(kind, status): {bucket bound: finished runs in that bucket (not cumulative)}} of the customers' runs (None:
    all). On PostgreSQL from RunDurationTally (kept by a trigger); elsewhere (SQLite development) from the runs."""
    out: dict[tuple[str, str], dict[float, int]] = {}
    if connection.vendor == "postgresql":
        tally = RunDurationTally.objects.filter(runs__gt=0, status__in=Run.TERMINAL)
        if customers is not None:
            tally = tally.filter(customer__in=customers)
        for r in tally.order_by().values("kind", "status", "le").annotate(n=Sum("runs")):
            out.setdefault((r["kind"], r["status"]), {})[r["le"]] = r["n"]
        return out
    runs = Run.objects.all() if customers is None else Run.objects.filter(customer__in=customers)
    rows = runs.filter(status__in=Run.TERMINAL, started_at__isnull=False, finished_at__isnull=False).values_list(
        "kind", "status", "started_at", "finished_at")
    for kind, status, started, finished in rows.iterator():
        took = (finished - started).total_seconds()
        le = next(b for b in RUN_DURATION_BUCKETS if took <= b)
        bucket = out.setdefault((kind, status), {})
        bucket[le] = bucket.get(le, 0) + 1
    return out


def duration_histogram(customers, sums: dict[tuple[str, str], float]) -> HistogramMetricFamily:
    """kasa_run_duration_seconds{kind, result}: finished runs (succeeded, failed, cancelled) by duration, with fixed
    buckets (operations.models.RUN_DURATION_BUCKETS); _sum from RunTally's summed seconds."""
    hist = HistogramMetricFamily("kasa_run_duration_seconds", "Duration of finished runs, by kind and result",
                                 labels=["kind", "result"])
    for (kind, status), per_bucket in sorted(duration_counts(customers).items()):
        total, buckets = 0, []
        for le in RUN_DURATION_BUCKETS:
            total += per_bucket.get(le, 0)
            buckets.append((floatToGoString(le), total))
        hist.add_metric([kind, status], buckets, sum_value=sums.get((kind, status), 0.0))
    return hist


def queue_metrics(customers=None):
    """Runs waiting for a worker (pending) and how long the oldest has waited (0 when none): one indexed query."""
    pending = Run.objects.filter(status=Run.Status.PENDING)
    if customers is not None:
        pending = pending.filter(customer__in=customers)
    row = pending.order_by().aggregate(n=Count("id"), oldest=Min("created_at"))
    depth = GaugeMetricFamily("kasa_queue_depth", "Runs pending (waiting for a worker)")
    depth.add_metric([], row["n"] or 0)
    age = GaugeMetricFamily("kasa_queue_oldest_age_seconds", "How long the oldest pending run has waited (0: none)")
    age.add_metric([], max((timezone.now() - row["oldest"]).total_seconds(), 0.0) if row["oldest"] else 0.0)
    yield depth
    yield age


def storage_metrics():
    """Per storage target: bytes written and read, storage errors (counters that never go down: TargetCounter),
    and whether the last target check passed (only targets ever checked)."""
    labels = ["target"]
    written = CounterMetricFamily("kasa_storage_written_bytes", "Bytes succeeded backups and replica copies stored",
                                  labels=labels)
    read = CounterMetricFamily("kasa_storage_read_bytes", "Bytes restores and verification drills read back",
                               labels=labels)
    errors = CounterMetricFamily("kasa_storage_errors", "Backups, restores, drills and checks a storage error ended",
                                 labels=labels)
    up = GaugeMetricFamily("kasa_storage_target_up", "1 when the target's last check passed, 0 when it failed",
                           labels=labels)
    checked = GaugeMetricFamily("kasa_storage_target_checked_timestamp_seconds", "When the target was last checked",
                                labels=labels)
    # Space used now (unlike the counters): what Kasa keeps on each target — its restorable backups, the expired ones
    # an object lock still holds, and their good replica copies. One grouped query over the backups per scrape
    # (hundreds of customers × tens of restore points: thousands of rows).
    stored = GaugeMetricFamily("kasa_storage_stored_bytes", "Bytes of the backups Kasa keeps on the target now "
                               "(succeeded and expired-but-locked backups and their replica copies)", labels=labels)
    kept = [Backup.Status.SUCCEEDED, Backup.Status.EXPIRED]
    used: dict[str, int] = {}
    for name, total in (Backup.objects.filter(status__in=kept).order_by().values_list("target__name")
                        .annotate(total=Sum("size"))):
        used[name] = used.get(name, 0) + (total or 0)
    for name, total in (BackupCopy.objects.filter(status="succeeded", backup__status__in=kept).order_by()
                        .values_list("target__name").annotate(total=Sum("backup__size"))):
        used[name] = used.get(name, 0) + (total or 0)
    for name in sorted(used):
        stored.add_metric([name], used[name])
    for name, w, r, e, ok, at in (TargetCounter.objects.order_by("target__name").values_list(
            "target__name", "written_bytes", "read_bytes", "errors", "check_ok", "checked_at")):
        written.add_metric([name], w)
        read.add_metric([name], r)
        errors.add_metric([name], e)
        if ok is not None:
            up.add_metric([name], 1 if ok else 0)
            checked.add_metric([name], at.timestamp())
    yield from (written, read, errors, up, checked, stored)


def worker_metrics() -> GaugeMetricFamily:
    """When each worker machine's qcluster last beat (operations.models.WorkerBeat, every KASA_HEARTBEAT_SECONDS)."""
    beats = GaugeMetricFamily("kasa_worker_heartbeat_timestamp_seconds", "When the worker last reported alive",
                              labels=["worker"])
    for name, seen in WorkerBeat.objects.order_by("name").values_list("name", "seen_at"):
        beats.add_metric([name], seen.timestamp())
    return beats


def recovery_metrics(customers=None):
    """RPO/RTO per customer (all when `customers` is None), the same figures as the admin's fleet overview:
    one query (backups.recovery.with_recovery), no model instances."""
    labels = ["customer"]
    rpo = GaugeMetricFamily("kasa_rpo_seconds", "Age of the newest verified backup (NaN: never verified)",
                            labels=labels)
    rpo_target = GaugeMetricFamily("kasa_rpo_target_seconds", "RPO target", labels=labels)
    rto = GaugeMetricFamily("kasa_rto_seconds", "Duration of the newest successful whole in-place restore or drill",
                            labels=labels)
    rto_target = GaugeMetricFamily("kasa_rto_target_seconds", "RTO target", labels=labels)
    outside = GaugeMetricFamily("kasa_outside_rpo", "1 when the customer is outside its RPO target", labels=labels)
    failed = GaugeMetricFamily("kasa_last_backup_failed", "1 when the newest finished backup failed", labels=labels)
    storage = GaugeMetricFamily("kasa_backup_storage_bytes", "Bytes of succeeded backups (primary)", labels=labels)
    # 3-2-1 of the newest verified backup (0 without one): backups.recovery.
    copies = GaugeMetricFamily("kasa_customer_backup_copies",
                               "Copies of the newest verified backup (primary and succeeded replicas)", labels=labels)
    offsite = GaugeMetricFamily("kasa_customer_backup_copies_offsite",
                                "Copies of the newest verified backup off this host (S3, SFTP)", labels=labels)
    immutable = GaugeMetricFamily("kasa_customer_backup_copies_immutable",
                                  "Copies of the newest verified backup under an Object Lock still in force",
                                  labels=labels)
    required = GaugeMetricFamily("kasa_customer_immutable_required",
                                 "1 when the customer's policy requires an immutable copy", labels=labels)
    quarantined = GaugeMetricFamily("kasa_upgrade_quarantined",
                                    "1 while an upgrade of the customer is quarantined (no operator resolved it)",
                                    labels=labels)
    held = set(Upgrade.objects.unresolved_quarantine().values_list("customer__domain", flat=True).distinct())
    now = timezone.now()
    qs = with_recovery(Customer.objects.all() if customers is None else customers, storage=True)
    for r in qs.order_by("domain").values("domain", "last_verified", "last_status", "rto_measured", "rpo_hours",
                                          "rto_minutes", "storage", "copies", "copies_offsite", "copies_immutable",
                                          "immutable_required"):
        d = [r["domain"]]
        verified = r["last_verified"]
        age = (now - verified).total_seconds() if verified is not None else None
        rpo.add_metric(d, age if age is not None else float("nan"))
        rpo_target.add_metric(d, r["rpo_hours"] * 3600)
        if r["rto_measured"] is not None:
            rto.add_metric(d, r["rto_measured"].total_seconds())
        rto_target.add_metric(d, r["rto_minutes"] * 60)
        outside.add_metric(d, 1 if age is None or age > r["rpo_hours"] * 3600 else 0)
        failed.add_metric(d, 1 if r["last_status"] == Backup.Status.FAILED else 0)
        storage.add_metric(d, r["storage"] or 0)
        copies.add_metric(d, r["copies"])
        offsite.add_metric(d, r["copies_offsite"])
        immutable.add_metric(d, r["copies_immutable"])
        required.add_metric(d, 1 if r["immutable_required"] else 0)
        quarantined.add_metric(d, 1 if r["domain"] in held else 0)
    yield from (rpo, rpo_target, rto, rto_target, outside, failed, storage, copies, offsite, immutable, required,
                quarantined)


def version_counts(customers=None) -> list[tuple[str, str, int]]:
    """(component, version, customers on it), counted by the database from each customer's versions (JSON): one
    query, whatever the number of customers (None: all of them)."""
    table = Customer._meta.db_table
    each = "jsonb_each_text(c.versions)" if connection.vendor == "postgresql" else "json_each(c.versions)"
    where, params = "", ()
    if customers is not None:
        inner, params = customers.order_by().values("pk").query.sql_with_params()
        where = f"AND c.id IN ({inner})"
    sql = (f"SELECT kv.key, kv.value, COUNT(*) FROM {table} c CROSS JOIN {each} kv "
           f"WHERE kv.value IS NOT NULL AND kv.value <> '' {where} GROUP BY kv.key, kv.value ORDER BY 1, 2")
    with connection.cursor() as cur:
        cur.execute(sql, params)
        return [(str(k), str(v), int(n)) for k, v, n in cur.fetchall()]


def version_metrics(customers=None) -> GaugeMetricFamily:
    versions = GaugeMetricFamily("kasa_customer_version", "Customers on each version of each component",
                                 labels=["component", "version"])
    for component, version, n in version_counts(customers):
        versions.add_metric([component, version], n)
    return versions


def rollout_metrics(user=None):
    """Each active or recently ended rollout's status (1 for its current one), and the latest result of each gate of
    each of its waves (1). Two queries; a staff member sees the rollouts whose every customer is of their teams."""
    state = GaugeMetricFamily("kasa_rollout_state", "Active and recently ended rollouts: 1 for the current status",
                              labels=["rollout", "release", "status"])
    gate = GaugeMetricFamily("kasa_rollout_gate_result", "The latest result of each gate of each wave (1)",
                             labels=["rollout", "wave", "gate", "result"])
    shown = Rollout.objects.filter(Q(status__in=Rollout.ACTIVE) | Q(finished_at__gte=timezone.now() - ROLLOUTS_RECENT))
    shown = visible_rollouts(user, shown) if user is not None else shown
    ids = []
    for pk, release, status in shown.order_by("pk").values_list("pk", "release__name", "status"):
        state.add_metric([str(pk), release, status], 1)
        ids.append(pk)
    if ids:
        latest = (GateResult.objects.filter(rollout_id__in=ids).order_by().values("rollout_id", "wave_id", "gate")
                  .annotate(last=Max("id")).values("last"))
        rows = (GateResult.objects.filter(pk__in=latest).order_by("rollout_id", "wave__position", "gate")
                .values_list("rollout_id", "wave__position", "gate", "result"))
        for rollout, wave, name, result in rows:
            gate.add_metric([str(rollout), str(wave), name, result], 1)
    yield state
    yield gate


def render(user=None) -> bytes:
    """The fleet's metrics; with `user`, only what that user may see (Customer.objects.visible_to)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KasaCollector(user))
    return generate_latest(registry)
