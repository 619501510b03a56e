"""The one percentile and timing summary every benchmark uses (nearest rank, no interpolation)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100): a value that was measured, never interpolated."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(ms: Sequence[float]) -> dict:
    """Median, p99 (nearest rank), min and max of times in ms."""
    return {
        "median_ms": statistics.median(ms),
        "p99_ms": percentile(ms, 99),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "reps": len(ms),
    }


def timed(fn: Callable[[], object], reps: int) -> list[float]:
    """Wall times of `reps` calls to `fn`, in ms."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, dict]:
    """Time several contenders round-robin (one call each per round), so load shifts hit them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: summary(ms) for name, ms in times.items()}
