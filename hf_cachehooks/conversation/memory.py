"""The token cache's memory tier: a byte-bounded LRU of conversation turns, each dropped after its TTL.

Keys are (conv_id, conversation uid, turn number); values are a turn's arrays (its own, or read-only maps of its
turn file, which cost no memory until touched but are counted at full size so the bound holds either way).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta

import numpy as np

from .._core.cache_config import days
from .._core.freshness import Clock, is_expired
from .files import MAX_TURNS

log = logging.getLogger(__name__)


class MemoryTier:
    """Byte-bounded LRU of turns (own arrays or read-only maps of turn files), each dropped `ttl` after it was
    stored (None: never); thread-safe."""

    def __init__(self, max_bytes: int, ttl: timedelta | None, clock: Clock) -> None:
        self.max_bytes, self.ttl, self.clock = max_bytes, ttl, clock
        self.nbytes = 0
        self._slots: OrderedDict[tuple, tuple[dict[str, np.ndarray], int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> dict[str, np.ndarray] | None:
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                return None
            if self.stale(slot[2], self.clock()):
                self._drop(key, "expired")
                return None
            self._slots.move_to_end(key)
            return slot[0]

    def put(self, key: tuple, arrays: dict[str, np.ndarray]) -> None:
        size = sum(a.nbytes for a in arrays.values())
        with self._lock:
            if key in self._slots:
                self._drop(key, "replaced")
            if size > self.max_bytes:  # one turn bigger than the whole tier: serve it from disk
                log.debug("Turn %s (%d bytes) exceeds the memory tier (%d bytes); not kept.", key, size, self.max_bytes)
                return
            self._slots[key] = (arrays, size, self.clock())
            self.nbytes += size
            while self.nbytes > self.max_bytes or len(self._slots) > MAX_TURNS:
                self._drop(next(iter(self._slots)), f"LRU (limit {self.max_bytes} B, {MAX_TURNS} turns)")

    def drop_where(self, reason: str, test: Callable[[tuple, float], bool]) -> None:
        """Drop every turn for which test(key, stored_at) is true."""
        with self._lock:
            for key in [key for key, slot in self._slots.items() if test(key, slot[2])]:
                self._drop(key, reason)

    def stale(self, stored_at: float, now: float) -> bool:
        return is_expired(stored_at, now, days(self.ttl))

    def _drop(self, key: tuple, reason: str) -> None:
        self.nbytes -= self._slots.pop(key)[1]
        log.debug("Memory tier evicted conversation %s turn %d: %s.", key[0], key[2], reason)
