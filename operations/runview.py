"""What a run page shows, as documents: rendered into the page when it opens and sent over the WebSocket on every
change (operations.consumers), so the two never disagree. Every number is formatted by engines.humanize."""

from __future__ import annotations

from django.utils import timezone

from engines.humanize import human_duration, human_time

from .models import Run
from .selectors import eta_text, remaining_seconds


def status_document(run: Run, details: dict) -> dict:
    """The run's status, times, worker, error, result summary and links (details: operations.registry.details)."""
    finished = run.status in Run.TERMINAL
    return {
        "status": run.status, "label": run.get_status_display(), "error": run.error, "finished": finished,
        "duration": run.duration, "duration_text": human_duration(run.duration) if run.duration is not None else "",
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "started": human_time(run.started_at) if run.started_at else "",
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "finished_text": human_time(run.finished_at) if run.finished_at else "",
        "worker": run.worker, "summary": details.get("summary", ""), "links": details.get("links", []),
    }


def phase_document(run: Run, typical: float | None) -> dict | None:
    """The current named phase, the overall percentage and what is left (None: a run without phases)."""
    if not run.phase_plan:
        return None
    names = [name for name, _ in run.phase_plan]
    percent = 100.0 if run.status == Run.Status.SUCCEEDED else float(run.percent or 0.0)
    remaining = None
    if run.status == Run.Status.RUNNING and run.started_at:
        elapsed = (timezone.now() - run.started_at).total_seconds()
        remaining = remaining_seconds(percent, elapsed, typical)
    return {
        "phase": run.phase, "phases": names, "index": names.index(run.phase) if run.phase in names else -1,
        "percent": round(percent, 1), "running": run.status == Run.Status.RUNNING,
        "eta": None if remaining is None else round(remaining, 1), "eta_text": eta_text(remaining),
    }
