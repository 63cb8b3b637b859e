"""Template filters for numbers a person reads: the same helpers as the CLI, run logs and notifications.

    {% load kasa_humanize %}
    {{ backup.size|human_size }} · {{ run.duration|human_duration }} · {{ backup.finished_at|human_time }}
"""

from django import template

from engines import humanize

register = template.Library()


@register.filter
def human_size(value):
    """Bytes in units that fit: 812 B, 4.1 kB, 12.3 MB, 1.02 GB; "—" when unknown."""
    if value is None or value == "":
        return "—"
    return humanize.human_size(float(value))


@register.filter
def human_duration(value):
    """Seconds (or a timedelta) as 0.4 s, 3 min 05 s, 2 h 05 min; "—" when unknown."""
    if value is None or value == "":
        return "—"
    if hasattr(value, "total_seconds"):
        value = value.total_seconds()
    return humanize.human_duration(float(value))


@register.filter
def human_time(value):
    """A timestamp to the second, in UTC (no microseconds); "—" when unknown."""
    return humanize.human_time(value or None)
