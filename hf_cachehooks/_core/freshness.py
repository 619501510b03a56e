"""Age expiry as pure functions of (created_at, now, max_age): tests pass a fake clock, never sleep."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from ..errors import ConfigError

Clock = Callable[[], float]
SYSTEM_CLOCK: Clock = time.time
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def is_expired(created_at: float, now: float, max_age_days: float | None) -> bool:
    """True when an entry made at `created_at` (epoch seconds) is older than `max_age_days` at `now`.

    `None` or a negative age means entries never expire.
    """
    if max_age_days is None or max_age_days < 0:
        return False
    return now - created_at > max_age_days * 86400


def parse_duration(value: str | float, unit: timedelta | None = None) -> timedelta:
    """A duration written `45s`, `30m`, `12h`, `7d` or `2w` (a decimal such as `1.5h` too) as a `timedelta`.

    A plain number (`7`, `"0.5"`) is read in `unit`, the unit of an older spelling (a `--max-age-days` flag,
    the YAML's `disk_days`); with no `unit` it is refused, since `7` could be days or seconds.

    Raises:
        ConfigError: anything else (negative, an unknown unit, no unit where one is needed), naming the
            value and the accepted forms.

    Example:
        >>> parse_duration("12h")
        datetime.timedelta(seconds=43200)
        >>> parse_duration(3, unit=timedelta(days=1)).days
        3
    """
    match = _DURATION.match(str(value))
    if isinstance(value, bool) or not match:
        raise ConfigError(f"Cannot read duration {value!r}. Use a number and a unit: 45s, 30m, 12h, 7d or 2w.")
    number, suffix = float(match.group(1)), match.group(2)
    if suffix:
        return timedelta(seconds=number * _UNIT_SECONDS[suffix])
    if unit is None:
        raise ConfigError(f"Duration {value!r} has no unit. Add one, e.g. {match.group(1)}d (days); also s, m, h, w.")
    return number * unit


def iso(epoch: float) -> str:
    """Epoch seconds as an ISO-8601 UTC timestamp, the form stored in entry metadata."""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds")


def describe_age(seconds: float) -> str:
    """A short human age: 42s, 5m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
