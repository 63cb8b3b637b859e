"""Prometheus metrics computed from the control database at scrape time.

Counting rows at scrape time (rather than keeping counters in memory) gives
the same numbers whichever web process answers and survives restarts.
"""

from __future__ import annotations

from django.db.models import Count, DurationField, ExpressionWrapper, F, Sum
from prometheus_client.core import CollectorRegistry, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.exposition import generate_latest


class KasaCollector:
    def collect(self):
        from customers.models import Customer
        from operations.models import Run

        runs = GaugeMetricFamily("kasa_runs", "Runs by kind and status", labels=["kind", "status"])
        for row in Run.objects.order_by().values("kind", "status").annotate(n=Count("id")):
            runs.add_metric([row["kind"], row["status"]], row["n"])
        yield runs

        durations = SummaryMetricFamily(
            "kasa_run_duration_seconds", "Duration of finished runs", labels=["kind", "status"]
        )
        elapsed = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
        for row in (
            Run.objects.order_by()
            .filter(started_at__isnull=False, finished_at__isnull=False)
            .values("kind", "status")
            .annotate(n=Count("id"), total=Sum(elapsed))
        ):
            total = row["total"].total_seconds() if row["total"] else 0.0
            durations.add_metric([row["kind"], row["status"]], count_value=row["n"], sum_value=total)
        yield durations

        customers = GaugeMetricFamily("kasa_customers", "Customers by status", labels=["status"])
        for row in Customer.objects.order_by().values("status").annotate(n=Count("id")):
            customers.add_metric([row["status"]], row["n"])
        yield customers


def render() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KasaCollector())
    return generate_latest(registry)
