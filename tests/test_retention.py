"""Retention planning (engines.retention), tested alone: no Django, plain records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from engines.retention import Item, Plan, Policy, plan

pytestmark = pytest.mark.smoke

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)  # a Sunday


def at(days_ago: float, hour: int = 0) -> datetime:
    return NOW - timedelta(days=days_ago) + timedelta(hours=hour)


def daily_backups(n: int, **kwargs) -> list[Item]:
    """One successful backup per day, id 1 the oldest, id n finished today."""
    return [Item(id=i, finished_at=at(n - i), succeeded=True, **kwargs) for i in range(1, n + 1)]


def kept(result: Plan) -> set[int]:
    return set(result.keep)


def test_every_item_is_either_kept_or_deleted_exactly_once():
    items = daily_backups(30) + [Item(id=99, finished_at=at(3.5), succeeded=False)]
    result = plan(items, Policy(keep_last=3, keep_weekly=2), NOW)
    assert sorted(list(result.keep) + result.delete) == sorted(i.id for i in items)


def test_empty_input_gives_an_empty_plan():
    assert plan([], Policy(), NOW) == Plan(keep={}, delete=[])


def test_keep_last_keeps_the_newest_n_successes():
    result = plan(daily_backups(8), Policy(keep_last=3), NOW)
    assert kept(result) == {6, 7, 8}
    assert result.delete == [5, 4, 3, 2, 1]  # newest first
    assert result.keep[8] == ["newest successful", "last 3"]


def test_keep_last_zero_still_keeps_the_newest_successful_backup():
    result = plan(daily_backups(4), Policy(keep_last=0), NOW)
    assert result.keep == {4: ["newest successful"]}


def test_keep_daily_keeps_the_newest_of_each_recent_day_that_has_a_backup():
    items = [
        Item(1, at(10, hour=1), True),
        Item(2, at(10, hour=9), True),  # same day as 1, later: wins that day
        Item(3, at(4, hour=2), True),  # a gap of days without backups does not use up the window
        Item(4, at(0, hour=-10), True),
        Item(5, at(0, hour=-11), True),
    ]
    result = plan(items, Policy(keep_last=0, keep_daily=3), NOW)
    assert kept(result) == {2, 3, 4}
    assert result.keep[2] == [f"daily {at(10).date().isoformat()}"]


def test_keep_weekly_uses_iso_weeks():
    # 2026-03-09 is a Monday: Sunday the 8th and Monday the 9th are in different ISO weeks.
    items = [
        Item(1, datetime(2026, 3, 1, 10, tzinfo=UTC), True),  # Sunday, week 9
        Item(2, datetime(2026, 3, 8, 23, tzinfo=UTC), True),  # Sunday, week 10
        Item(3, datetime(2026, 3, 9, 1, tzinfo=UTC), True),  # Monday, week 11
        Item(4, datetime(2026, 3, 12, 1, tzinfo=UTC), True),  # Thursday, week 11
    ]
    result = plan(items, Policy(keep_last=0, keep_weekly=2), NOW)
    assert kept(result) == {2, 4}
    assert result.keep[2] == ["weekly 2026-W10"]


def test_keep_monthly_uses_calendar_months():
    items = [
        Item(1, datetime(2025, 12, 31, 23, tzinfo=UTC), True),
        Item(2, datetime(2026, 1, 1, 1, tzinfo=UTC), True),
        Item(3, datetime(2026, 1, 30, tzinfo=UTC), True),
        Item(4, datetime(2026, 2, 2, tzinfo=UTC), True),
        Item(5, datetime(2026, 3, 1, tzinfo=UTC), True),
    ]
    result = plan(items, Policy(keep_last=0, keep_monthly=3), NOW)
    assert kept(result) == {3, 4, 5}
    assert plan(items, Policy(keep_last=0, keep_monthly=12), NOW).delete == [2]


def test_keep_verified_keeps_the_newest_verified_even_when_older_than_keep_last():
    items = daily_backups(10)
    items[1] = Item(2, items[1].finished_at, True, verified=True)
    items[3] = Item(4, items[3].finished_at, True, verified=True)
    items[5] = Item(6, items[5].finished_at, True, verified=True)
    result = plan(items, Policy(keep_last=2, keep_verified=2), NOW)
    assert kept(result) == {9, 10, 4, 6}
    assert result.keep[4] == ["verified (newest 2)"]


def test_rules_combine_as_a_union_with_every_reason_listed():
    result = plan(daily_backups(60), Policy(keep_last=2, keep_daily=5, keep_weekly=3, keep_monthly=3), NOW)
    assert result.keep[60] == ["newest successful", "last 2", "daily 2026-03-15", "weekly 2026-W11", "monthly 2026-03"]
    # daily: 15th..11th; weekly: Sundays the 15th, 8th and 1st (id 53, 46); monthly: Feb 28th (45), Jan 31st (17)
    assert kept(result) == {60, 59, 58, 57, 56, 53, 46, 45, 17}


def test_failures_after_successes_never_push_good_backups_out():
    # pgbackweb counted failed runs toward "keep the last N" and deleted the good ones.
    good = daily_backups(5)
    failures = [Item(100 + i, at(0, hour=1 + i), succeeded=False) for i in range(10)]
    result = plan(good + failures, Policy(keep_last=5), NOW + timedelta(hours=12))
    assert {1, 2, 3, 4, 5} <= kept(result) and result.delete == []
    reason = "failed after the newest successful backup (kept for inspection)"
    assert all(result.keep[f.id] == [reason] for f in failures)


def test_failures_older_than_the_newest_success_are_deleted():
    items = daily_backups(3) + [Item(50, at(1.5), succeeded=False), Item(51, at(-0.1), succeeded=False)]
    result = plan(items, Policy(keep_last=5), NOW)
    assert result.delete == [50]
    assert 51 in result.keep


def test_failures_are_never_deleted_when_nothing_ever_succeeded():
    items = [Item(i, at(100 - i), succeeded=False) for i in range(5)]
    result = plan(items, Policy(keep_last=1, max_age_days=1), NOW)
    assert result.delete == [] and kept(result) == {0, 1, 2, 3, 4}


def test_order_is_by_finish_time_not_by_id():
    # WAL-G picked "the newest" by name; here ids run against time.
    items = [Item(id=10 - i, finished_at=at(i), succeeded=True) for i in range(6)]  # id 10 is the newest
    items.reverse()
    result = plan(items, Policy(keep_last=2), NOW)
    assert kept(result) == {10, 9}
    assert result.keep[10][0] == "newest successful"
    shuffled = [Item(id=1, finished_at=at(0), succeeded=True), Item(id=2, finished_at=at(5), succeeded=True)]
    assert plan(shuffled, Policy(keep_last=1), NOW).delete == [2]


def test_ties_on_the_same_instant_are_resolved_stably():
    items = [Item(7, at(1), True), Item(3, at(1), True), Item(5, at(1), True)]
    first = plan(items, Policy(keep_last=1, keep_daily=1), NOW)
    assert first == plan(list(reversed(items)), Policy(keep_last=1, keep_daily=1), NOW)
    assert kept(first) == {7}


def test_max_age_deletes_old_backups_even_when_counting_rules_would_keep_them():
    result = plan(daily_backups(20), Policy(keep_last=10, keep_monthly=6, max_age_days=5), NOW)
    # 6 backups are at most 5 days old (ages 0..5)
    assert kept(result) == {15, 16, 17, 18, 19, 20}


def test_max_age_never_deletes_the_newest_successful_backup():
    items = daily_backups(3)
    old = [Item(i.id, i.finished_at - timedelta(days=400), True) for i in items]
    result = plan(old, Policy(keep_last=3, max_age_days=30), NOW)
    assert result.keep == {3: ["newest successful (older than max age)"]}
    assert result.delete == [2, 1]


def test_pinned_backups_survive_max_age_and_every_count():
    items = daily_backups(50)
    items[0] = Item(1, items[0].finished_at, True, pinned=True)
    items[1] = Item(2, items[1].finished_at, False, pinned=True)  # even a pinned failure
    result = plan(items, Policy(keep_last=1, max_age_days=7), NOW)
    assert result.keep[1] == ["pinned"] and result.keep[2] == ["pinned"]
    assert 3 in result.delete


def test_a_pinned_backup_does_not_take_a_keep_last_slot_from_the_others():
    items = daily_backups(4)
    items[3] = Item(4, items[3].finished_at, True, pinned=True)
    result = plan(items, Policy(keep_last=2), NOW)
    assert result.keep[4] == ["pinned", "newest successful", "last 2"]
    assert kept(result) == {3, 4}


def test_negative_policy_values_are_refused():
    with pytest.raises(ValueError):
        Policy(keep_last=-1)
    with pytest.raises(ValueError):
        Policy(max_age_days=-3)


def test_the_newest_verified_backup_is_kept_even_with_keep_verified_zero():
    items = daily_backups(6)
    items[1] = Item(2, items[1].finished_at, True, verified=True)
    items[0] = Item(1, items[0].finished_at, True, verified=True)
    result = plan(items, Policy(keep_last=1, keep_verified=0), NOW)
    assert kept(result) == {6, 2}
    assert result.keep[2] == ["newest verified"]


def test_the_verified_floor_holds_past_max_age():
    items = [Item(1, at(40), True, verified=True), Item(2, at(1), True), Item(3, at(0), True)]
    result = plan(items, Policy(keep_last=5, max_age_days=30), NOW)
    assert result.keep[1] == ["newest verified (older than max age)"]
    assert kept(result) == {1, 2, 3}


def test_a_backup_restored_from_lately_is_kept_and_no_longer_after_the_window():
    items = daily_backups(6)
    items[0] = Item(1, items[0].finished_at, True, restored_at=at(2))
    items[1] = Item(2, items[1].finished_at, True, restored_at=at(9))
    result = plan(items, Policy(keep_last=2, keep_restored_days=7), NOW)
    assert kept(result) == {1, 5, 6}
    assert result.keep[1] == [f"restored from on {at(2).date().isoformat()} (within 7 days)"]
    assert 2 in result.delete
    assert plan(items, Policy(keep_last=2, keep_restored_days=0), NOW).delete == [4, 3, 2, 1]


def test_a_backup_restored_from_lately_survives_max_age():
    items = [Item(1, at(100), True, restored_at=at(1)), Item(2, at(0), True)]
    result = plan(items, Policy(keep_last=5, max_age_days=30), NOW)
    assert kept(result) == {1, 2}


def test_safety_backups_never_take_a_regular_backups_place():
    # Regular daily backups 1..4, then two safety backups (an upgrade's and a restore's), newest of all.
    items = daily_backups(4) + [Item(5, at(0, hour=2), True, safety=True), Item(6, at(0, hour=3), True, safety=True)]
    result = plan(items, Policy(keep_last=2), NOW)
    assert {3, 4} <= kept(result)  # the two newest regular backups, as if no safety backup existed
    assert result.keep[4] == ["last 2"] and result.keep[3] == ["last 2"]
    assert result.keep[6] == ["newest successful", "last 2"] and result.keep[5] == ["last 2"]
    assert result.delete == [2, 1]


def test_pinned_safety_backups_do_not_push_a_verified_backup_out():
    # The sequence of issue 12: B verified and restored from, then pinned safety backups of a restore and
    # an upgrade; the policy keeps one backup by count.
    items = [Item(1, at(3), True), Item(2, at(2), True, verified=True, restored_at=at(0, hour=-3)),
             Item(3, at(0, hour=-3), True, pinned=True, safety=True),
             Item(4, at(0, hour=-1), True, pinned=True, safety=True)]
    result = plan(items, Policy(keep_last=1), NOW)
    assert result.delete == [1]
    assert result.keep[2][:2] == ["newest verified", f"restored from on {at(0, hour=-3).date().isoformat()} "
                                                     "(within 7 days)"]
    assert "last 1" in result.keep[2]  # B is the newest regular backup: counted as if the safety ones were not there
    result = plan([i if i.id != 2 else Item(2, at(2), True, verified=True) for i in items], Policy(keep_last=1), NOW)
    assert result.keep[2] == ["newest verified", "last 1"]  # without the restore, still kept twice over


def test_keep_restored_days_cannot_be_negative():
    with pytest.raises(ValueError):
        Policy(keep_restored_days=-1)
