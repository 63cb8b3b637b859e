"""Which backups to delete: a pure function over (id, time, outcome) records.

The rules follow restic's `forget` and Borg's `prune`, with the lessons of
tools that lost good backups:

- Order is by finish time, never by id or name (WAL-G once sorted by name).
- Only successful backups count. A run of failures must not push good backups
  out of "keep the last N" (pgbackweb's bug), so failures are never counted.
- keep_daily N keeps the newest backup of each of the N most recent days that
  *have* a backup (not "the last N calendar days"), so a week-long outage does
  not empty the window. Weekly uses ISO weeks, monthly calendar months; days
  are UTC days.
- keep_verified N keeps the newest N successful backups whose restore was
  verified: a backup known to restore is worth more than a newer unknown one.
  The newest verified backup is kept whatever N is (the verified floor).

Precedence, strongest first (rules 0-4 hold even past max age):
0. a kept differential keeps the full backup it applies on (a chain is never broken);
1. pinned backups are kept (by hand or by an upgrade), whatever their age or outcome;
2. the newest successful backup is kept, so there is always something to restore from;
3. the newest verified backup is kept (the verified floor), whatever keep_verified says: the one
   backup known to restore is never traded for newer unknown ones;
4. a backup restored from within the last keep_restored_days days is kept: someone needed it
   lately and may need it again (e.g. after an upgrade that follows the restore);
5. max_age_days is a ceiling: a successful backup older than that that no rule above keeps is
   deleted even if keep_last/daily/weekly/monthly/verified would keep it. (If those rules won
   instead, max age could never delete anything they had not already dropped; its point is a hard
   limit, e.g. for data-protection.)
6. keep_last, keep_daily, keep_weekly, keep_monthly, keep_verified. Safety backups (taken by an
   upgrade or a restore as the way back) never take a regular backup's place here: the regular
   backups are counted among themselves, as if no safety backup existed, and a safety backup is
   kept when it would be among all backups.
Everything else is deleted.

Failed backups are deleted (their partial artifacts are junk) only when they
finished before the newest successful backup; a failure newer than that is kept
for inspection, and with no successful backup at all no failure is deleted.
Ties on the same instant are broken by id, only so that the result is stable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta


@dataclass(frozen=True)
class Item:
    id: int
    finished_at: datetime  # aware, UTC
    succeeded: bool
    pinned: bool = False
    verified: bool = False
    safety: bool = False  # taken by an upgrade or a restore as its way back
    restored_at: datetime | None = None  # when a restore last started from it
    base_id: int | None = None  # a differential: the full its service archives apply on


@dataclass
class Policy:
    keep_last: int = 5
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    max_age_days: int | None = None
    keep_verified: int = 0
    keep_restored_days: int = 7

    def __post_init__(self) -> None:
        counts = (self.keep_last, self.keep_daily, self.keep_weekly, self.keep_monthly, self.keep_verified,
                  self.keep_restored_days)
        if min(counts) < 0 or (self.max_age_days is not None and self.max_age_days < 0):
            raise ValueError("retention counts, keep_restored_days and max_age_days cannot be negative")


@dataclass
class Plan:
    keep: dict[int, list[str]] = field(default_factory=dict)  # id -> why, newest first
    delete: list[int] = field(default_factory=list)  # newest first
    # Filled by the caller that applies the plan: of `delete`, those an object lock keeps for now (id -> until),
    # and earlier expired backups whose lock has ended and whose objects went in this pass.
    locked: dict[int, object] = field(default_factory=dict)
    purged: list[int] = field(default_factory=list)


def _day(t: datetime) -> str:
    return t.date().isoformat()


def _week(t: datetime) -> str:
    iso = t.isocalendar()
    return f"{iso.year}-W{iso.week:02d}"


def _month(t: datetime) -> str:
    return f"{t.year}-{t.month:02d}"


def _buckets(good: list[Item], n: int, key: Callable[[datetime], str]) -> dict[int, str]:
    """The newest backup of each of the n most recent buckets that hold one (good is newest first)."""
    chosen: dict[int, str] = {}
    seen: set[str] = set()
    for item in good:
        if len(seen) >= n:
            break
        bucket = key(item.finished_at.astimezone(UTC))
        if bucket not in seen:
            seen.add(bucket)
            chosen[item.id] = bucket
    return chosen


def _counted(good: list[Item], policy: Policy) -> dict[int, list[str]]:
    """Reasons from the counting rules (keep_last, daily, weekly, monthly, verified), good newest first."""
    counted: dict[int, list[str]] = {}
    for item in good[: policy.keep_last]:
        counted.setdefault(item.id, []).append(f"last {policy.keep_last}")
    for label, n, key in (
        ("daily", policy.keep_daily, _day),
        ("weekly", policy.keep_weekly, _week),
        ("monthly", policy.keep_monthly, _month),
    ):
        for item_id, bucket in _buckets(good, n, key).items():
            counted.setdefault(item_id, []).append(f"{label} {bucket}")
    for item in [i for i in good if i.verified][: policy.keep_verified]:
        counted.setdefault(item.id, []).append(f"verified (newest {policy.keep_verified})")
    return counted


def plan(items: list[Item], policy: Policy, now: datetime) -> Plan:
    """Split finished backups into keep (with reasons) and delete, by the rules above."""
    ordered = sorted(items, key=lambda i: (i.finished_at, i.id), reverse=True)
    good = [i for i in ordered if i.succeeded]
    newest = good[0] if good else None
    newest_verified = next((i for i in good if i.verified), None)
    cutoff = now - timedelta(days=policy.max_age_days) if policy.max_age_days is not None else None
    restored_since = now - timedelta(days=policy.keep_restored_days)

    # Counting rules, subject to max age. Regular backups are counted as if no safety backup existed.
    counted = _counted([i for i in good if not i.safety], policy)
    among_all = _counted(good, policy)
    for item in good:
        if item.safety and item.id in among_all:
            counted[item.id] = among_all[item.id]

    result = Plan()
    for item in ordered:
        reasons = []
        expired = cutoff is not None and item.finished_at < cutoff
        old = " (older than max age)" if expired else ""
        if item.pinned:
            reasons.append("pinned")
        if item is newest:
            reasons.append("newest successful" + old)
        if item is newest_verified:
            reasons.append("newest verified" + old)
        if item.succeeded and item.restored_at is not None and item.restored_at >= restored_since:
            reasons.append(f"restored from on {_day(item.restored_at.astimezone(UTC))} "
                           f"(within {policy.keep_restored_days} days)")
        if item.succeeded:
            if not expired:  # max age overrides the counting rules
                reasons += counted.get(item.id, [])
        elif newest is None or item.finished_at >= newest.finished_at:
            reasons.append("failed after the newest successful backup (kept for inspection)")
        if reasons:
            result.keep[item.id] = reasons
        else:
            result.delete.append(item.id)
    # A chain is never broken (rule 0, above every other): a kept differential keeps the full it applies on,
    # whatever that full's age or place in the counts.
    by_id = {i.id: i for i in items}
    for item in ordered:
        if item.succeeded and item.id in result.keep and item.base_id is not None and item.base_id in by_id:
            reason = f"the full backup that differential #{item.id} needs"
            result.keep.setdefault(item.base_id, []).append(reason)
            if item.base_id in result.delete:
                result.delete.remove(item.base_id)
    return result
