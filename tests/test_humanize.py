"""Numbers a person reads (engines.humanize): fitting units, no microseconds."""

import datetime as dt

import pytest

from engines.humanize import human_duration, human_size, human_time

pytestmark = pytest.mark.smoke


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (812, "812 B"), (4100, "4.1 kB"), (12_300_000, "12.3 MB"),
                                          (1_020_000_000, "1.02 GB"), (123_400_000_000, "123.4 GB"), (None, "—")])
def test_sizes_use_the_unit_that_fits(n, text):
    assert human_size(n) == text


@pytest.mark.parametrize(("s", "text"), [(0.4, "0.4 s"), (12, "12.0 s"), (185, "3 min 05 s"),
                                          (7500, "2 h 05 min"), (3 * 86400 + 4 * 3600, "3 d 04 h"), (None, "—")])
def test_durations_never_show_microseconds(s, text):
    assert human_duration(s) == text


def test_timestamps_are_to_the_second_in_utc():
    when = dt.datetime(2026, 12, 5, 1, 31, 7, 123456, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert human_time(when) == "2026-12-05 00:31:07 UTC"
