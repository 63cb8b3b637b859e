"""Read-only questions about runs, for pages and the live consumer.

typical_seconds: how long a kind of run usually takes for one customer — the median of its last successful
runs of that kind, in one query. It is the estimate a confirmation page shows before a run starts ("usually
about 40 s") and the ETA of a run whose own progress does not tell yet.
"""

from __future__ import annotations

import statistics

from engines.humanize import human_duration

from .models import Run

SAMPLE = 10  # the most recent successful runs the estimate looks at
MIN_PERCENT = 5.0  # below this share done, the run's own pace says too little: the history estimates
MIN_ELAPSED = 3.0  # seconds: the pace settles first


def typical_seconds(customer_id: int, kind: str) -> float | None:
    """The median duration of the customer's last SAMPLE successful runs of `kind`; None without any."""
    rows = list(Run.objects.filter(customer_id=customer_id, kind=kind, status=Run.Status.SUCCEEDED,
                                   started_at__isnull=False, finished_at__isnull=False)
                .order_by("-finished_at").values_list("started_at", "finished_at")[:SAMPLE])
    if not rows:
        return None
    return statistics.median(max(0.0, (end - start).total_seconds()) for start, end in rows)


def estimate_text(customer_id: int, kind: str) -> str:
    """"usually about 40.0 s" from the customer's history of `kind`; "" when there is none."""
    seconds = typical_seconds(customer_id, kind)
    return "" if seconds is None else f"usually about {human_duration(seconds)}"


def remaining_seconds(percent: float, elapsed: float, typical: float | None) -> float | None:
    """What is left of a running run: from its own pace once it says enough, else from the history."""
    if percent >= 100:
        return 0.0
    if percent >= MIN_PERCENT and elapsed >= MIN_ELAPSED:
        return elapsed * (100.0 - percent) / percent
    if typical is not None:
        return max(typical - elapsed, 0.0)
    return None


def eta_text(remaining: float | None) -> str:
    if remaining is None:
        return ""
    if remaining < 1:
        return "almost done"
    return f"about {human_duration(remaining)} left"
