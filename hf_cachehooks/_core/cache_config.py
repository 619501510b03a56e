"""One cache vocabulary: `CacheConfig` (where, how long, recompute or not) and the one adapter that maps the
older keyword spellings onto it.

Every cache takes a `CacheConfig`: `EvalConfig(cache=...)`, `GenerationCache(model, cache=...)`,
`cache_activations(..., cache=...)` and the token cache's disk tier (`TokenCacheConfig(cache=...)`). The
keywords they took before (`experiments_dir`, `directory`, `max_age_days`, `disk_ttl_seconds`, ...) still
work: `settle` turns them into a `CacheConfig` here, and only here, and says once per process that each is
deprecated (a `FutureWarning` naming the replacement). `EvalConfig` keeps its familiar keywords without a
warning (`FAMILIAR`). Durations are `timedelta`s; `days` is the one conversion to the entry contract's days.

Each cache's default age is stated once, in `DEFAULT_MAX_AGE`: `CacheConfig()` leaves `max_age` at
`OWN_DEFAULT`, which `settle` replaces with that cache's entry, so a cache expires the same with or without
`cache=CacheConfig()`.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import ConfigError
from .freshness import SYSTEM_CLOCK, is_expired
from .store import cache_root, local_path

_DAY = timedelta(days=1)
_SECOND = timedelta(seconds=1)


class _OwnDefault(timedelta):
    """The type of `OWN_DEFAULT`: a duration only so that `CacheConfig.max_age` keeps one type; it equals
    nothing but itself, so it is never mistaken for `timedelta(0)`."""

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return "OWN_DEFAULT"

    def __reduce__(self) -> str:
        return "OWN_DEFAULT"  # copies and pickles are the one instance


# `CacheConfig.max_age` left unset: "this cache's own default", from `DEFAULT_MAX_AGE` when a cache settles it.
OWN_DEFAULT: timedelta = _OwnDefault()

# Each cache's default age, keyed by the name `settle` gets as its owner; None never expires. The only place
# these are stated: the keyword defaults (`cache_max_age_days`, `disk_ttl_seconds`) are read from here too.
DEFAULT_MAX_AGE: Mapping[str, timedelta | None] = {
    "EvalConfig": timedelta(days=30),  # predictions
    "GenerationCache": None,  # generations
    "cache_activations": None,  # activation stores
    "TokenCacheConfig": timedelta(days=7),  # conversations on disk: the idle limit
}


def days(age: timedelta | None) -> float | None:
    """`age` in days, the unit of `is_expired` and the entry contract (None stays None: never expires)."""
    return None if age is None else age / _DAY


def seconds(age: timedelta | None) -> float | None:
    """`age` in seconds, the unit of the token cache's `disk_ttl_seconds` (None stays None: never expires)."""
    return None if age is None else age / _SECOND


def duration(value: timedelta | float) -> timedelta:
    """A duration as a `timedelta`: a `timedelta` as is, a number as seconds (the older spelling).

    Raises:
        ConfigError: `value` is neither.

    Example:
        >>> duration(5) == duration(timedelta(seconds=5))
        True
    """
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"Duration {value!r} is neither a timedelta nor a number of seconds; pass e.g. timedelta(seconds=60)."
        )
    return float(value) * _SECOND


@dataclass(frozen=True)
class CacheConfig:
    """Where a cache lives, how long its entries stay valid, and whether to use them at all.

    Args:
        root: the cache root; None reads $HF_CACHEHOOKS_HOME when the cache is used, else `outputs/cache`.
            Each cache keeps its entries in its own folder under it (`predictions/`, `experiments/`,
            `conversations/`, ...).
        folder: one cache's own folder, used instead of `<root>/<its name>` (leave it None when one
            `CacheConfig` serves several caches). `cache_activations` writes to the folder you pass it.
        max_age: entries older than this are misses, recomputed and replaced; None: they never expire.
            Left out, each cache keeps its own default (`DEFAULT_MAX_AGE`: predictions 30 days, generations
            and activation stores never, conversations 7 days). The token cache's disk tier deletes a
            conversation idle for longer than this.
        force_recompute: ignore what is cached, compute again and replace it.
        enabled: False computes without reading or writing the cache.
        lock_stale_after: a single-flight lock whose holder has not written a heartbeat for this long is
            broken (the holder is taken to be dead).
        clock: epoch seconds now; tests pass a fake one. Not part of equality.

    Raises:
        ConfigError: a duration that is negative or not a `timedelta`, or a flag that is not a bool.

    Example:
        >>> CacheConfig(max_age=timedelta(days=7)).max_age_days
        7.0
        >>> CacheConfig(root="/tmp/c").folder_for("predictions").as_posix()
        '/tmp/c/predictions'
    """

    root: str | os.PathLike | None = None
    folder: str | os.PathLike | None = None
    max_age: timedelta | None = OWN_DEFAULT
    force_recompute: bool = False
    enabled: bool = True
    lock_stale_after: timedelta = timedelta(seconds=60)
    clock: Callable[[], float] = field(default=SYSTEM_CLOCK, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("root", "folder"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ConfigError(f"CacheConfig {name}={value!r} is not a path; pass a str or pathlib.Path (or None).")
            if value == "":
                raise ConfigError(f"CacheConfig {name}='' is empty; pass a folder, or None for the default.")
        if self.max_age is not None and self.max_age is not OWN_DEFAULT:
            _check_duration("max_age", self.max_age, "None (never expires)")
        _check_duration("lock_stale_after", self.lock_stale_after, "timedelta(seconds=60)")
        if self.lock_stale_after <= timedelta(0):
            raise ConfigError(
                f"CacheConfig lock_stale_after={self.lock_stale_after!r} must be positive, e.g. timedelta(seconds=60)."
            )
        for name in ("force_recompute", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"CacheConfig {name}={getattr(self, name)!r} must be True or False.")
        if not callable(self.clock):
            raise ConfigError(
                f"CacheConfig clock={self.clock!r} is not callable; pass a function returning "
                "epoch seconds, e.g. time.time."
            )

    @property
    def max_age_days(self) -> float | None:
        """`max_age` in days (None: never expires), for the entry contract's `is_expired`.

        Raises:
            ConfigError: `max_age` was left to the cache's own default, which only a cache resolves.
        """
        if self.max_age is OWN_DEFAULT:
            raise ConfigError(
                "This CacheConfig leaves max_age to each cache's own default; "
                "read it from the settings a cache resolved (EvalConfig(...).resolved_cache, "
                "GenerationCache(...).cache), or set max_age."
            )
        return days(self.max_age)

    @property
    def stale_after_seconds(self) -> float:
        """`lock_stale_after` in seconds, for the lock's heartbeat check."""
        return self.lock_stale_after / _SECOND

    def resolve_root(self) -> Path:
        """The cache root now: `root`, else $HF_CACHEHOOKS_HOME, else `outputs/cache`."""
        return cache_root(self.root)

    def folder_for(self, name: str) -> Path:
        """This cache's folder: `folder` when set, else `<root>/<name>`."""
        return local_path(self.folder) if self.folder is not None else self.resolve_root() / name

    def expired(self, created_at: float, now: float | None = None) -> bool:
        """True when an entry made at `created_at` (epoch seconds) is older than `max_age` at `now` (default: clock)."""
        return is_expired(created_at, self.clock() if now is None else now, self.max_age_days)

    @property
    def reads(self) -> bool:
        """True when cached entries may be served: enabled and not forced to recompute."""
        return self.enabled and not self.force_recompute

    @classmethod
    def from_keywords(cls, **keywords: Any) -> CacheConfig:
        """A `CacheConfig` from the keyword spellings the caches took before it (see `KEYWORDS`).

        Ages in days (`cache_max_age_days`, `max_age_days`) and seconds (`disk_ttl_seconds`,
        `lock_stale_after` as a number) become `timedelta`s; None or a negative age never expires.

        Raises:
            ConfigError: an unknown keyword, or a value of the wrong kind.

        Example:
            >>> CacheConfig.from_keywords(use_prediction_cache=False, cache_max_age_days=7).enabled
            False
        """
        return cls(**_translate(keywords))


def _check_duration(name: str, value: Any, example: str) -> None:
    if not isinstance(value, timedelta):
        raise ConfigError(
            f"CacheConfig {name}={value!r} is not a duration; pass a datetime.timedelta, "
            f"e.g. timedelta(days=7), or {example}."
        )
    if value < timedelta(0):
        raise ConfigError(f"CacheConfig {name}={value!r} is negative; pass a positive timedelta, or {example}.")


def _age_in(unit: timedelta) -> Callable[[Any], timedelta | None]:
    def convert(value: Any) -> timedelta | None:
        if value is None:
            return None
        if isinstance(value, timedelta):
            return None if value < timedelta(0) else value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"Age {value!r} is not a number; pass a number or None (never expires).")
        return None if value < 0 else value * unit  # negative: never expires, as before

    return convert


def _same(value: Any) -> Any:
    return value


def _path(value: Any) -> Any:
    return value or None  # "" meant "the default" for these keywords


# keyword -> (CacheConfig field, conversion of its value)
KEYWORDS: Mapping[str, tuple[str, Callable[[Any], Any]]] = {
    "use_prediction_cache": ("enabled", _same),
    "force_recompute": ("force_recompute", _same),
    "cache_max_age_days": ("max_age", _age_in(_DAY)),
    "max_age_days": ("max_age", _age_in(_DAY)),
    "disk_ttl_seconds": ("max_age", _age_in(_SECOND)),
    "cache_dir": ("root", _path),
    "predictions_cache_dir": ("folder", _path),
    "experiments_dir": ("folder", _path),
    "directory": ("folder", _path),
    "lock_stale_after": ("lock_stale_after", duration),
    "clock": ("clock", _same),
}


# The CacheConfig spelling of each keyword, for the deprecation warning.
_NEW_SPELLING: Mapping[str, str] = {
    "use_prediction_cache": "enabled=...",
    "force_recompute": "force_recompute=...",
    "cache_max_age_days": "max_age=timedelta(days=...)",
    "max_age_days": "max_age=timedelta(days=...)",
    "disk_ttl_seconds": "max_age=timedelta(seconds=...)",
    "cache_dir": "root=...",
    "predictions_cache_dir": "folder=...",
    "experiments_dir": "folder=...",
    "directory": "folder=...",
    "lock_stale_after": "lock_stale_after=timedelta(seconds=...)",
    "clock": "clock=...",
}

# The keywords an owner keeps without a warning: `EvalConfig`'s familiar ones (its `lock_stale_after` is a
# `timedelta`, as in CacheConfig; `EvalConfig` itself warns for a number of seconds).
FAMILIAR: Mapping[str, frozenset[str]] = {
    "EvalConfig": frozenset(
        {"use_prediction_cache", "force_recompute", "cache_max_age_days", "predictions_cache_dir", "lock_stale_after"}
    ),
}

# (owner, old spelling) pairs already warned about in this process; tests clear it to see a warning again.
WARNED: set[tuple[str, str]] = set()
_PACKAGE = str(Path(__file__).resolve().parent.parent) + os.sep


def warn_deprecated(owner: str, old: str, new: str) -> None:
    """Say once per process that `owner(old)` is deprecated, naming `new`, its replacement.

    A `FutureWarning` (shown by default), pointed at the first caller outside the package.

    Example:
        >>> warn_deprecated("GenerationCache", "experiments_dir=...", "cache=CacheConfig(folder=...)")  # doctest: +SKIP
        FutureWarning: GenerationCache(experiments_dir=...) is deprecated; pass cache=CacheConfig(folder=...).
    """
    if (owner, old) in WARNED:
        return
    WARNED.add((owner, old))
    level = 1
    frame: FrameType | None = sys._getframe(0)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE) or frame.f_code.co_filename == "<string>"
    ):  # a dataclass's own __init__
        level, frame = level + 1, frame.f_back
    warnings.warn(f"{owner}({old}) is deprecated; pass {new}.", FutureWarning, stacklevel=level)


def _translate(keywords: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in keywords.items():
        if name not in KEYWORDS:
            raise ConfigError(f"Unknown cache keyword {name!r}; known: {', '.join(sorted(KEYWORDS))}.")
        target, convert = KEYWORDS[name]
        out[target] = convert(value)
    return out


def settle(
    cache: CacheConfig | None, keywords: Mapping[str, Any], defaults: Mapping[str, Any], owner: str
) -> CacheConfig:
    """The `CacheConfig` in effect: `cache` when given, else the one the keyword spellings describe.

    `keywords` are the values the caller got for its keyword spellings and `defaults` their defaults; a keyword
    left at its default says nothing. With `cache` given, a keyword set away from its default must agree with
    `cache`: settings live in one place. A `max_age` left at `OWN_DEFAULT` becomes `DEFAULT_MAX_AGE[owner]`,
    so the age is the same with or without `cache`. Each keyword set away from its default, unless it is one
    of `FAMILIAR[owner]`, warns once per process (`warn_deprecated`) that `cache=CacheConfig(...)` replaces it.

    Example:
        >>> settle(None, {"experiments_dir": "e"}, {"experiments_dir": None}, "GenerationCache").folder
        FutureWarning: GenerationCache(experiments_dir=...) is deprecated; pass cache=CacheConfig(folder=...).
        'e'

    Raises:
        ConfigError: `cache` is not a CacheConfig, or a keyword disagrees with it (names both and the fix).
    """
    given = {
        name: value for name, value in keywords.items() if not (name in defaults and _equal(value, defaults[name]))
    }
    for name in sorted(given.keys() - FAMILIAR.get(owner, frozenset())):
        warn_deprecated(owner, f"{name}=...", f"cache=CacheConfig({_NEW_SPELLING.get(name, '...')})")
    if cache is None:
        return _own_age(CacheConfig.from_keywords(**given), owner)
    if not isinstance(cache, CacheConfig):
        raise ConfigError(f"{owner}(cache={cache!r}): pass a hf_cachehooks.CacheConfig, or None.")
    cache = _own_age(cache, owner)
    for name, value in given.items():
        target, convert = KEYWORDS[name]
        if not _equal(convert(value), getattr(cache, target)):
            raise ConfigError(
                f"{owner} got cache=CacheConfig({target}={getattr(cache, target)!r}) and "
                f"{name}={value!r}; set it in one place: CacheConfig({target}={convert(value)!r}), "
                f"or drop {name}."
            )
    return cache


def _own_age(cache: CacheConfig, owner: str) -> CacheConfig:
    return replace(cache, max_age=DEFAULT_MAX_AGE[owner]) if cache.max_age is OWN_DEFAULT else cache


def _equal(a: Any, b: Any) -> bool:
    if callable(a) or callable(b):
        return a is b
    if isinstance(a, os.PathLike) or isinstance(b, os.PathLike):
        return a is not None and b is not None and Path(a) == Path(b)
    return bool(a == b)
