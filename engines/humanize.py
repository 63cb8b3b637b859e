"""Numbers a person reads: sizes, durations and timestamps, the same in the admin, the CLI, run logs and
notifications. Plain Python, no Django."""

from __future__ import annotations

import datetime as dt


def human_size(n: float | None) -> str:
    """Decimal units that fit: 0 B, 812 B, 4.1 kB, 12.3 MB, 1.02 GB."""
    if n is None:
        return "—"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            if unit == "B":
                return f"{n:.0f} B"
            return f"{n:.2f} {unit}" if unit in ("GB", "TB") and abs(n) < 10 else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def human_duration(seconds: float | None) -> str:
    """0.4 s, 12.0 s, 3 min 05 s, 2 h 05 min, 3 d 04 h; never microseconds."""
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours:02d} h"


def human_time(when: dt.datetime | None) -> str:
    """A timestamp to the second, in UTC: 2026-12-05 00:31:07 UTC."""
    if when is None:
        return "—"
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC)
    return f"{when:%Y-%m-%d %H:%M:%S} UTC"
