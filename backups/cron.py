"""Cron expressions of backup policies: what croniter (and so django-q2) accepts. Below backups.models (which
validates a policy's expression) and backups.schedules (which turns policies into schedules)."""

from __future__ import annotations

from datetime import datetime

from croniter import croniter
from django.utils import timezone


class ScheduleError(ValueError):
    """A policy cannot be turned into a schedule (a bad cron expression); the message names it."""


def validate_cron(expr: str) -> str:
    """The expression, stripped, if croniter (and so django-q2) accepts it as a 5-field cron; else ScheduleError."""
    expr = (expr or "").strip()
    if not expr:
        raise ScheduleError("the schedule is 'cron' but no cron expression is set")
    if len(expr.split()) != 5 and not expr.startswith("@"):  # @daily, @hourly… are fine too
        raise ScheduleError(f"invalid cron expression {expr!r}: use five fields, "
                            "minute hour day-of-month month day-of-week (e.g. '30 2 * * *')")
    if not croniter.is_valid(expr):
        raise ScheduleError(f"invalid cron expression {expr!r}: e.g. '30 2 * * *' is 02:30 every day")
    try:
        croniter(expr, timezone.localtime()).get_next(datetime)
    except Exception as exc:  # valid syntax that never fires, e.g. '0 0 31 2 *'
        raise ScheduleError(f"cron expression {expr!r} never fires: {exc}") from None
    return expr
