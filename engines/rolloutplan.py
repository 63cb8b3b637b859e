"""The arithmetic of a fleet rollout, with no Django: wave sizes, the stable order of customers, bake times and
daily maintenance windows. rollouts.planning applies it to customers; everything here is testable alone.

Waves are cumulative percentages of the selection (`10,25,50,100`): wave i holds the customers up to
ceil(p_i % of n), and at least one more than the wave before (a small fleet still gets every wave's step). The
order is canaries first, then by the sha256 of the domain, so the same selection always gives the same waves
(reproducible, shown before confirmation) and no customer is always first by name.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_WAVES = (10, 25, 50, 100)
DEFAULT_BAKES = (1800, 3600, 7200)  # 30 m, 1 h, 2 h; the last wave has no bake of its own
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$", re.I)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class PlanError(ValueError):
    """Bad input for a plan; the message says what and how to write it."""


def parse_percents(text: str | Sequence[int]) -> list[int]:
    """`10,25,50,100` → [10, 25, 50, 100]: rising, each 1…100, the last 100 (every selected customer)."""
    items = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(p) for p in text]
    try:
        values = [int(p.rstrip("%")) for p in items if p]
    except ValueError:
        raise PlanError(f"waves must be whole percentages separated by commas, like 10,25,50,100 (got {text!r})") \
            from None
    if not values:
        raise PlanError("give at least one wave (100 for everyone at once)")
    if any(not 0 < v <= 100 for v in values) or any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise PlanError(f"waves must rise from 1 to 100 (cumulative percentages of the selection), got {text!r}")
    if values[-1] != 100:
        raise PlanError(f"the last wave must be 100 (every selected customer), got {values[-1]}")
    return values


def parse_duration(text: str | float | int) -> int:
    """`30m`, `1h`, `90s`, `0`, `1.5h` → seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        m = _DURATION.match(str(text))
        if not m:
            raise PlanError(f"a duration is a number with s, m, h or d, like 30m or 1h (got {text!r})")
        seconds = float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()]
    if seconds < 0 or seconds > 30 * 86400:
        raise PlanError(f"a duration must be between 0 and 30 days (got {text!r})")
    return int(round(seconds))


def parse_bakes(text: str | Sequence, waves: int) -> list[int]:
    """One bake per wave but the last (`30m,1h,2h`); a shorter list repeats its last value, and a single `0` means
    no bake anywhere. The last wave gets 0: nothing follows it to protect."""
    items = [p for p in text.split(",") if p.strip()] if isinstance(text, str) else list(text)
    values = [parse_duration(p) for p in items] or [0]
    bakes = [values[min(i, len(values) - 1)] for i in range(max(waves - 1, 0))]
    return [*bakes, 0][:waves] if waves else []


def wave_counts(total: int, percents: Sequence[int]) -> list[tuple[int, int]]:
    """(percent, how many customers) of each wave (not cumulative): ceil(p% of total), at least one more than the
    wave before while customers are left. Waves that would be empty are dropped (a tiny fleet has fewer waves)."""
    counts, done = [], 0
    for p in percents:
        upto = min(total, max(math.ceil(total * p / 100), done + 1))
        if upto > done:
            counts.append((p, upto - done))
            done = upto
    return counts


def order_key(domain: str, canary: bool) -> tuple[int, str]:
    """Canaries first, then by a hash of the domain: stable for a customer, spread over the alphabet."""
    return (0 if canary else 1, hashlib.sha256(domain.encode()).hexdigest())


def assign_waves(members: Iterable[tuple[str, bool]], percents: Sequence[int]) -> list[tuple[int, list[str]]]:
    """(domain, is_canary) pairs → (percent, the domains) of each wave, in order."""
    ordered = [d for d, c in sorted(members, key=lambda m: order_key(m[0], m[1]))]
    waves, at = [], 0
    for p, n in wave_counts(len(ordered), percents):
        waves.append((p, ordered[at:at + n]))
        at += n
    return waves


# --- maintenance windows ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """A daily window [start, end) in a time zone; end before start spans midnight (22:00-04:00)."""

    start: time
    end: time
    zone: str = "UTC"

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M} {self.zone}"

    @property
    def tz(self) -> tzinfo:
        return ZoneInfo(self.zone)

    def contains(self, moment: datetime) -> bool:
        local = moment.astimezone(self.tz).time().replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def next_opening(self, moment: datetime) -> datetime:
        """The next moment the window opens (now, when it is open)."""
        if self.contains(moment):
            return moment
        local = moment.astimezone(self.tz)
        opening = local.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)
        if opening <= local:
            opening += timedelta(days=1)
        return opening


def parse_window(text: str, zone: str = "UTC") -> Window | None:
    """`01:00-05:00` (in `zone`, an IANA name) → Window; "" → None (any time)."""
    text = (text or "").strip()
    if not text:
        return None
    m = re.fullmatch(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})", text)
    if not m:
        raise PlanError(f"a window is HH:MM-HH:MM, like 01:00-05:00 (got {text!r})")
    h1, m1, h2, m2 = (int(x) for x in m.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59 or (h1, m1) == (h2, m2):
        raise PlanError(f"a window needs two different times of day, like 01:00-05:00 (got {text!r})")
    try:
        ZoneInfo(zone or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise PlanError(f"unknown time zone {zone!r} (an IANA name, like Europe/Berlin)") from None
    return Window(time(h1, m1), time(h2, m2), zone or "UTC")
