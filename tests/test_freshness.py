"""Age expiry and durations (hf_cachehooks/_core/freshness.py): a fake clock, never a sleep."""

from __future__ import annotations

from datetime import timedelta

import pytest

from hf_cachehooks._core.freshness import describe_age, is_expired, iso, parse_duration
from hf_cachehooks.errors import ConfigError

DAY = 86400
T0 = 1_700_000_000.0  # created_at of the entry under test


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize("max_age_days", [1, 7, 0.5, 30])
def test_is_expired_boundary(max_age_days):
    clock = FakeClock(T0)
    assert not is_expired(T0, clock(), max_age_days)  # brand new
    clock.advance(max_age_days * DAY - 1)
    assert not is_expired(T0, clock(), max_age_days)
    clock.advance(1)  # exactly max age: still fresh
    assert not is_expired(T0, clock(), max_age_days)
    clock.advance(1)  # one second more: expired
    assert is_expired(T0, clock(), max_age_days)
    clock.advance(365 * DAY)
    assert is_expired(T0, clock(), max_age_days)


def test_is_expired_zero_days_expires_after_any_time():
    assert not is_expired(T0, T0, 0)
    assert is_expired(T0, T0 + 1, 0)


@pytest.mark.parametrize("max_age_days", [None, -1, -0.5])
def test_none_or_negative_never_expires(max_age_days):
    assert not is_expired(T0, T0 + 100 * 365 * DAY, max_age_days)
    assert not is_expired(0, T0, max_age_days)


def test_entry_from_the_future_is_fresh():
    assert not is_expired(T0 + DAY, T0, 1)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7d", 7 * DAY),
        ("12h", 12 * 3600),
        ("30m", 30 * 60),
        ("2w", 14 * DAY),
        ("45s", 45),
        ("1.5h", 5400),
        (" 7d ", 7 * DAY),
        ("7 d", 7 * DAY),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        ("3", timedelta(days=1), timedelta(days=3)),  # a plain number is read in the older spelling's unit
        (3, timedelta(days=1), timedelta(days=3)),
        (0.5, timedelta(days=1), timedelta(hours=12)),
        (90, timedelta(minutes=1), timedelta(minutes=90)),
        ("2h", timedelta(days=1), timedelta(hours=2)),  # a unit always wins
    ],
)
def test_parse_duration_reads_a_plain_number_in_the_given_unit(value, unit, expected):
    assert parse_duration(value, unit=unit) == expected


def test_parse_duration_refuses_a_plain_number_without_a_unit():
    with pytest.raises(ConfigError, match=r"'7' has no unit\. Add one, e\.g\. 7d"):
        parse_duration("7")


@pytest.mark.parametrize("bad", ["soon", "", "7y", "-3d", "d", "7dd", "1e3", True])
def test_parse_duration_rejects_bad_values_naming_them(bad):
    with pytest.raises(ConfigError) as info:
        parse_duration(bad)
    assert repr(bad) in str(info.value)
    assert "7d" in str(info.value)  # says what would work


def test_parse_duration_error_is_a_value_error():
    with pytest.raises(ValueError, match="'soon'"):
        parse_duration("soon")


def test_iso_is_utc():
    assert iso(0) == "1970-01-01T00:00:00+00:00"
    assert iso(T0) == "2023-11-14T22:13:20+00:00"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (42, "42s"), (60, "1m"), (5 * 60, "5m"), (3 * 3600, "3h"), (2 * DAY, "2d"), (10 * DAY, "10d")],
)
def test_describe_age(seconds, text):
    assert describe_age(seconds) == text
