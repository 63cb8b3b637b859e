"""Prometheus metrics computed from the control database at scrape time.

Counting rows at scrape time (rather than keeping counters in memory) gives
the same numbers whichever web process answers and survives restarts.
A staff member sees only the customers of their teams (and their runs); the
metrics token (Prometheus) and superusers see the whole fleet.
"""

from __future__ import annotations

from django.db.models import Count, DurationField, ExpressionWrapper, F, Sum
from prometheus_client.core import CollectorRegistry, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.exposition import generate_latest


class KasaCollector:
    def __init__(self, user=None):
        self.user = user  # None: the whole fleet

    def collect(self):
        from customers.models import Customer
        from operations.models import Run

        customers_qs = Customer.objects.all() if self.user is None else Customer.objects.visible_to(self.user)
        runs_qs = Run.objects.all() if self.user is None else Run.objects.visible_to(self.user)
        runs = GaugeMetricFamily("kasa_runs", "Runs by kind and status", labels=["kind", "status"])
        for row in runs_qs.order_by().values("kind", "status").annotate(n=Count("id")):
            runs.add_metric([row["kind"], row["status"]], row["n"])
        yield runs

        durations = SummaryMetricFamily(
            "kasa_run_duration_seconds", "Duration of finished runs", labels=["kind", "status"]
        )
        elapsed = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
        for row in (
            runs_qs.order_by()
            .filter(started_at__isnull=False, finished_at__isnull=False)
            .values("kind", "status")
            .annotate(n=Count("id"), total=Sum(elapsed))
        ):
            total = row["total"].total_seconds() if row["total"] else 0.0
            durations.add_metric([row["kind"], row["status"]], count_value=row["n"], sum_value=total)
        yield durations

        customers = GaugeMetricFamily("kasa_customers", "Customers by status", labels=["status"])
        for row in customers_qs.order_by().values("status").annotate(n=Count("id")):
            customers.add_metric([row["status"]], row["n"])
        yield customers
        yield from recovery_metrics(None if self.user is None else customers_qs)


def recovery_metrics(customers=None):
    """RPO/RTO per customer (all when `customers` is None), the same figures as the admin's fleet dashboard."""
    from backups.recovery import fleet

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
    for r in fleet(customers):
        d = [r.customer.domain]
        current = r.rpo_current
        rpo.add_metric(d, current.total_seconds() if current is not None else float("nan"))
        rpo_target.add_metric(d, r.rpo_target.total_seconds())
        if r.rto_measured is not None:
            rto.add_metric(d, r.rto_measured)
        rto_target.add_metric(d, r.rto_target.total_seconds())
        outside.add_metric(d, 1 if r.outside_rpo else 0)
        failed.add_metric(d, 1 if r.last_failed else 0)
        storage.add_metric(d, r.storage)
    yield from (rpo, rpo_target, rto, rto_target, outside, failed, storage)


def render(user=None) -> bytes:
    """The fleet's metrics; with `user`, only what that user may see (Customer.objects.visible_to)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KasaCollector(user))
    return generate_latest(registry)
