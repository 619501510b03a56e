"""Age expiry as pure functions of (created_at, now, max_age): tests pass a fake clock, never sleep."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime, timezone

from ..errors import ConfigError

Clock = Callable[[], float]
SYSTEM_CLOCK: Clock = time.time
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "": 86400}


def is_expired(created_at: float, now: float, max_age_days: float | None) -> bool:
    """True when an entry made at `created_at` (epoch seconds) is older than `max_age_days` at `now`.

    `None` or a negative age means entries never expire.
    """
    if max_age_days is None or max_age_days < 0:
        return False
    return now - created_at > max_age_days * 86400


def parse_duration(text: str, *, require_unit: bool = False) -> float:
    """Parse `7d`, `12h`, `30m`, `2w` or a bare number of days into seconds.

    With `require_unit` a bare number is refused (the command line: `7` could be days or seconds).
    """
    match = _DURATION.match(str(text))
    if not match:
        raise ConfigError(f"Cannot read duration {text!r}. Use a number and a unit, e.g. 7d, 12h, 30m, 2w.")
    if require_unit and not match.group(2):
        raise ConfigError(f"Duration {text!r} has no unit. Add one, e.g. {match.group(1)}d (days); "
                          "also s, m, h, w.")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def iso(epoch: float) -> str:
    """Epoch seconds as an ISO-8601 UTC timestamp, the form stored in entry metadata."""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds")


def describe_age(seconds: float) -> str:
    """A short human age: 42s, 5m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
