"""Conversation token cache: each token's per-layer hidden state and top-k lens predictions, one click away.

    <the disk tier's folder: CacheConfig folder, else <cache root>/conversations>/
    ├── CACHEDIR.TAG                  marks the folder as this library's cache
    ├── .locks/<conv_id>.lock         appends to one conversation serialize on this lease
    └── <conv_id>/                    one entry of kind "conversation" (see `entry`)
        ├── conversation.json         sealed manifest, written last: the contract's fields (key digest = the
        │                             conversation's uid, files: name -> bytes, xxh3, stamp if >= 1 MiB) and its own:
        │                             format, conv_id, uid, turns (start, count, file, bytes, lens_file, k),
        │                             tokens, layers, hidden, hidden_dtype, pinned, meta, k, last_access,
        │                             model (the identity of the model and tokenizer that wrote it)
        ├── .last_access              touched by reads; its mtime is the conversation's last access
        ├── turn-00000.safetensors    one turn, contiguous: token_ids (T,), hidden (T, L, H)
        └── lens-00000.safetensors    its lens: topk_ids (T, L, K), topk_probs (T, L, K); written with the
                                      turn or later (add_lens), so a reply need not wait for its lens

A lookup tries a byte-bounded LRU of turns in memory, else memory-maps the token's turn file, checks it
against the manifest (size; content hash when under 1 MiB or when its stamp moved) and promotes the turn (no
copy: 0.1 ms for an 18 MB turn). A manifest naming another conversation (folders swapped) or of the wrong
shape is a miss with a warning; deleting a conversation removes only the files its manifest lists. A cache
made with a model (the chat server's) neither serves nor continues a conversation another model wrote, or
one that records no model: hidden states and lens are one model's. Bytes on disk are safetensors and sealed
JSON: never pickle. The tiers are `memory.MemoryTier` and `disk.DiskTier` (manifests: `manifests`; turn files:
`files`); `TokenCache` checks what callers pass, moves turns between the tiers and evicts.
"""

from __future__ import annotations

import bisect
import logging
import operator
import struct
import threading
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import numpy as np
import orjson

from .._core.freshness import Clock
from ..errors import ConfigError, MissingDependencyError
from .disk import DiskTier
from .files import (
    CorruptTurn,
    TokenCacheConfig,
    TokenRecord,
    check_lens,
    check_turn,
    read_turn,
    turn_nbytes,
    validate_conv_id,
)
from .manifests import appended, model_record, other_model, started
from .memory import MemoryTier

log = logging.getLogger(__name__)


class TokenCache:
    """Two-tier cache of conversation tokens: memory LRU in front of turn files on disk.

    Args:
        config: sizes, codec, lifetimes and the disk tier's `CacheConfig` (folder, idle limit, lock, clock).
        clock: returns epoch seconds; tests pass a fake one. Default: the disk tier's CacheConfig clock.
        model, tokenizer: the model whose tokens this cache stores (its weights are hashed once, here). Each
            new conversation records their identity, and a conversation that records another (or none, as
            before this version) is neither served nor continued: a miss for reads, a ConfigError for
            `append_turn` (see `refusal`). Without them every conversation is served, and only those that
            record no model are continued.

    Example:
        >>> cache = TokenCache(TokenCacheConfig(directory="conversations"))  # doctest: +SKIP
        >>> cache.append_turn("chat-1", ids, hidden, topk_ids, topk_probs)  # doctest: +SKIP
        (0, 42)
        >>> cache.token("chat-1", 7).topk_ids  # (layers, k)  # doctest: +SKIP
    """

    def __init__(
        self,
        config: TokenCacheConfig | None = None,
        clock: Clock | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        self.config = config or TokenCacheConfig()
        self.model_record = None if model is None else model_record(model, tokenizer)  # JSON data, in each manifest
        self._settings = self.config.resolved_cache
        self.root = self._settings.folder_for("conversations")
        self._disk = DiskTier(self.root, self._settings, self.config.compression, self.model_record)
        self._clock = clock = clock or self._settings.clock
        self._memory = MemoryTier(self.config.memory_max_bytes, self.config.memory_ttl, clock)
        self._stats = {"memory_hits": 0, "disk_hits": 0, "misses": 0}
        self._stats_lock = threading.Lock()

    # Writing ---------------------------------------------------------------------------------------

    def append_turn(
        self,
        conv_id: str,
        token_ids: Any,
        hidden: Any,
        topk_ids: Any = None,
        topk_probs: Any = None,
        meta: Mapping[str, Any] | None = None,
    ) -> tuple[int, int]:
        """Store one turn of T new tokens contiguously; return its global token range [start, end).

        Args:
            token_ids: (T,) integers.
            hidden: (T, layers, hidden) float16, or uint16 holding bfloat16 bits.
            topk_ids: (T, layers, k) integers; topk_probs: (T, layers, k) floats, stored as float16. Both may be
                left out and added later with `add_lens` (until then a token's record has topk_ids None).
            meta: JSON data merged into the conversation's `meta` (model name, ...).

        Raises:
            ConfigError: for a bad id, shapes or dtypes, shapes unlike the conversation's earlier turns, or a
                conversation another model wrote (see `refusal`). An unwritable disk is not an error: the turn
                is kept in memory only, with a warning.
        """
        validate_conv_id(conv_id)
        arrays, tag = check_turn(token_ids, hidden, topk_ids, topk_probs)
        try:
            extra = orjson.loads(orjson.dumps(dict(meta or {})))
        except TypeError as exc:
            raise ConfigError(f"meta must be plain JSON data: {exc}.") from exc
        self._disk.tag()
        with self._disk.hold(conv_id) as locked:
            now = self._clock()
            _, layers, hidden_size = arrays["hidden"].shape
            dims = {"layers": layers, "hidden": hidden_size, "hidden_dtype": tag}
            doc = self._disk.manifest(conv_id, served=False)
            if doc is not None and (refused := other_model(conv_id, doc, self.model_record)):
                raise ConfigError(refused)  # never one conversation of two models
            doc = doc or started(conv_id, self.model_record, dims, now)
            if (stored := {name: doc[name] for name in dims}) != dims:
                raise ConfigError(
                    f"Conversation {conv_id} stores {stored}; this turn has {dims}. Start a new conversation id "
                    "for another model."
                )
            k = self._check_k(conv_id, doc, arrays["topk_ids"].shape[2]) if "topk_ids" in arrays else None
            meta = {**extra, "hidden_dtype": tag}
            new = appended(doc, len(arrays["token_ids"]), k, self.config.compression, meta, now)
            self._disk.append(conv_id, new, arrays, locked)  # to disk, else kept in memory only (logged)
            self._memory.put((conv_id, doc["uid"], len(doc["turns"])), arrays)
        self.evict()
        return doc["tokens"], new["tokens"]

    def add_lens(self, conv_id: str, start: int, topk_ids: Any, topk_probs: Any, stats: Any = None) -> bool:
        """Store the lens of the turn that begins at token `start` (stored earlier without one), with its
        per-layer `stats` (T, layers, 4) when given (see `files.STATS`).

        Returns:
            False when the conversation or turn is gone (deleted or evicted meanwhile), else True.

        Raises:
            ConfigError: for shapes unlike the turn's (T, layers, k), or a k unlike the conversation's.
        """
        validate_conv_id(conv_id)
        with self._disk.hold(conv_id) as locked:
            found = self._disk.turn_starting(conv_id, start)
            if found is None:
                return False
            doc, turn_no = found
            lens = check_lens(topk_ids, topk_probs, doc["turns"][turn_no]["count"], doc["layers"], stats)
            self._check_k(conv_id, doc, lens["topk_ids"].shape[2])
            self._disk.add_lens(conv_id, doc, turn_no, lens, locked)  # to disk when the turn is there (else logged)
            arrays = self._whole_turn(conv_id, doc, turn_no)
            if arrays is not None:
                self._memory.put((conv_id, doc["uid"], turn_no), {**arrays, **lens})
        return True

    def _check_k(self, conv_id: str, doc: dict, k: int) -> int:
        if doc["k"] not in (None, k):
            raise ConfigError(
                f"Conversation {conv_id} keeps top-{doc['k']} lens predictions; this lens has "
                f"top-{k}. Use one k per conversation."
            )
        return k

    # Reading ---------------------------------------------------------------------------------------

    def token(self, conv_id: str, index: int) -> TokenRecord | None:
        """The token at global `index`, from memory, else from disk; None when absent or unreadable.

        Raises:
            ConfigError: for a malformed conversation id (a missing one is simply None).
            TypeError: for an index that is not an integer.
        """
        index = operator.index(index)
        records = self.tokens(conv_id, index, index + 1)
        if not records and not 0 <= index < self.length(conv_id):
            self._count("misses")
        return records[0] if records else None

    def tokens(self, conv_id: str, start: int, end: int) -> list[TokenRecord]:
        """Tokens in [start, end) that are cached, clipped to the conversation (for context windows).

        A turn missing from memory is read once for the whole range, not once per token.
        """
        found = self._disk.read(validate_conv_id(conv_id))
        if found is None:
            return []
        (doc, starts), records = found, []
        index, end = max(0, operator.index(start)), min(operator.index(end), doc["tokens"])
        while index < end:
            turn_no = bisect.bisect_right(starts, index) - 1
            base = starts[turn_no]
            first, stop = index - base, min(end, base + doc["turns"][turn_no]["count"]) - base
            index = base + stop
            arrays, offset = self._memory.get((conv_id, doc["uid"], turn_no)), 0
            if arrays is not None:
                self._count("memory_hits", stop - first)
            else:
                arrays, offset = self._from_disk(conv_id, doc, turn_no, slice(first, stop))
                self._count("misses" if arrays is None else "disk_hits", stop - first)
                if arrays is None:
                    continue
            lens, stats = "topk_ids" in arrays, arrays.get("stats")
            records += [
                TokenRecord(
                    conv_id,
                    base + row,
                    int(arrays["token_ids"][row - offset]),
                    arrays["topk_ids"][row - offset] if lens else None,
                    arrays["topk_probs"][row - offset] if lens else None,
                    arrays["hidden"][row - offset],
                    doc["hidden_dtype"],
                    None if stats is None else stats[row - offset],
                )
                for row in range(first, stop)
            ]
        if records:
            self._disk.touch(conv_id, self._clock())
        return records

    def _from_disk(self, conv_id: str, doc: dict, turn_no: int, rows: slice | None) -> tuple[dict | None, int]:
        """The turn's arrays from disk, promoted to memory, and 0; or, when the turn could not stay in memory
        and `rows` are asked for, copies of just those rows and the turn row the first of them is."""
        turn = doc["turns"][turn_no]
        if turn["file"] is None:
            return None, 0  # a memory-only turn that the memory tier has let go
        path = self.root / conv_id / turn["file"]
        try:
            if turn_nbytes(doc, turn_no) > self.config.memory_max_bytes and rows is not None:  # it would not stay
                return read_turn(path.parent, doc, turn_no, rows), rows.start
            arrays = read_turn(path.parent, doc, turn_no, None)
        except FileNotFoundError:
            log.debug("Turn file %s vanished (conversation deleted meanwhile); a miss.", path)
            return None, 0
        except (OSError, ValueError, TypeError, KeyError, struct.error, CorruptTurn, MissingDependencyError) as exc:
            log.warning("Cannot read cached turn %s (%s); treating token as a miss.", path, exc)
            return None, 0
        self._memory.put((conv_id, doc["uid"], turn_no), arrays)
        return arrays, 0

    def turn_arrays(self, conv_id: str, start: int) -> dict[str, np.ndarray] | None:
        """The whole turn that begins at token `start` (read-only arrays: token_ids, hidden, and topk_ids and
        topk_probs once its lens is stored), from memory or disk; None when absent or unreadable."""
        found = self._disk.turn_starting(validate_conv_id(conv_id), start)
        return None if found is None else self._whole_turn(conv_id, *found)

    def _whole_turn(self, conv_id: str, doc: dict, turn_no: int) -> dict[str, np.ndarray] | None:
        arrays = self._memory.get((conv_id, doc["uid"], turn_no))
        return arrays if arrays is not None else self._from_disk(conv_id, doc, turn_no, None)[0]

    def pending_lens(self) -> list[tuple[str, int, int]]:
        """(conv_id, start, end) of every stored turn still without its lens, oldest conversation first."""
        rows = sorted(self.conversations(), key=lambda r: r["created_at"])
        return [
            (r["conv_id"], t["start"], t["start"] + t["count"])
            for r in rows
            for t in self.turns(r["conv_id"])
            if t["k"] is None
        ]

    def token_ids(self, conv_id: str) -> np.ndarray:
        """Every token id of the conversation in order (int32; empty when it is unknown or a turn is unreadable).

        Raises:
            ConfigError: for a malformed conversation id.
        """
        doc, parts = self._disk.manifest(validate_conv_id(conv_id)), []
        if doc is None:
            return np.zeros(0, np.int32)
        for turn_no in range(len(doc["turns"])):
            arrays = self._whole_turn(conv_id, doc, turn_no)
            if arrays is None:
                return np.zeros(0, np.int32)
            parts.append(arrays["token_ids"])
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def length(self, conv_id: str) -> int:
        """Number of tokens stored for the conversation (0 when unknown)."""
        doc = self._disk.manifest(validate_conv_id(conv_id))
        return 0 if doc is None else int(doc["tokens"])

    # Managing --------------------------------------------------------------------------------------

    def turns(self, conv_id: str) -> list[dict]:
        """The conversation's turns as stored in its manifest (start, count, bytes, file, ...); [] when unknown."""
        doc = self._disk.manifest(validate_conv_id(conv_id))
        return [] if doc is None else [dict(t) for t in doc["turns"]]

    def meta(self, conv_id: str) -> dict | None:
        """The conversation's `meta` (merged over its turns), or None if it is unknown."""
        doc = self._disk.manifest(validate_conv_id(conv_id))
        return None if doc is None else dict(doc.get("meta", {}))

    def conversations(self) -> list[dict]:
        """One row per conversation: conv_id, tokens, turns, bytes, pinned, last_access, created_at."""
        return [row for row in map(self._disk.row, self._disk.names()) if row is not None]

    def conversation(self, conv_id: str) -> dict | None:
        """One conversation's row as `conversations` lists it; None when it is unknown.

        Listed whatever model wrote it (it takes disk space, and can be pinned or deleted); `refusal` says
        whether this cache serves its tokens.
        """
        return self._disk.row(validate_conv_id(conv_id))

    def refusal(self, conv_id: str) -> str | None:
        """Why this cache neither serves nor continues conversation `conv_id` (another model wrote it, or it
        records none); None when it does, or the conversation is unknown. A cache made without a model serves
        every conversation and says only why it would not continue one."""
        doc = self._disk.manifest(validate_conv_id(conv_id), served=False)
        return None if doc is None else other_model(conv_id, doc, self.model_record)

    def pin(self, conv_id: str, pinned: bool = True) -> bool:
        """Keep (or stop keeping) a conversation through every eviction; False when it is unknown."""
        validate_conv_id(conv_id)
        with self._disk.hold(conv_id):
            doc = self._disk.manifest(conv_id, served=False)
            return doc is not None and self._disk.save(conv_id, {**doc, "pinned": pinned})

    def delete(self, conv_id: str) -> bool:
        """Remove a conversation from both tiers; False when it was not there.

        On disk only its manifest and the files it lists go (a file it does not list stays, and so does a
        folder holding another conversation's manifest); the folder goes when that left it empty.
        """
        validate_conv_id(conv_id)
        return self._remove(conv_id, "deleted on request")

    def status(self) -> dict[str, int]:
        """Tier sizes, limits, conversation count and hit counters since this instance started."""
        rows = self.conversations()
        return {
            "memory_bytes": self._memory.nbytes,
            "memory_limit": self.config.memory_max_bytes,
            "disk_bytes": sum(r["bytes"] for r in rows),
            "disk_limit": self.config.disk_max_bytes,
            "conversations": len(rows),
            **self._stats,
        }

    def evict(self) -> list[str]:
        """Drop expired memory turns; delete idle and least-recently-used unpinned conversations from disk.

        Returns:
            The conversation ids deleted from disk. Pinned ones stay even when that leaves the disk over
            its limit (logged as a warning).
        """
        now, limit = self._clock(), self._settings.max_age or timedelta(0)  # idle implies a max_age
        self._memory.drop_where("expired", lambda _, stored_at: self._memory.stale(stored_at, now))
        rows = sorted(
            (r for r in self.conversations() if not self._disk.memory_only(r["conv_id"])),
            key=lambda r: r["last_access"],
        )
        total, gone = sum(r["bytes"] for r in rows), []
        for r in rows:
            if r["pinned"]:
                continue
            idle = self._settings.expired(r["last_access"], now)
            if not idle and total <= self.config.disk_max_bytes:
                continue
            reason = (
                f"idle for {now - r['last_access']:.0f}s (limit {limit.total_seconds():.0f}s)"
                if idle
                else f"least recently used; disk tier {total} bytes > {self.config.disk_max_bytes}"
            )
            if self._remove(r["conv_id"], reason, r["last_access"]):
                total -= r["bytes"]
                gone.append(r["conv_id"])
        if total > self.config.disk_max_bytes:
            log.warning(
                "Disk tier holds %d bytes, over its %d-byte limit, all in pinned conversations; "
                "unpin some or raise disk max_size_gb.",
                total,
                self.config.disk_max_bytes,
            )
        return gone

    def _remove(self, conv_id: str, reason: str, planned_access: float | None = None) -> bool:
        if not self._disk.knows(conv_id):
            return False
        with self._disk.hold(conv_id):
            if planned_access is not None and not self._disk.unchanged(conv_id, planned_access):
                return False  # used, pinned or removed since eviction planned it
            self._memory.drop_where(reason, lambda key, _: key[0] == conv_id)
            existed = self._disk.remove(conv_id)
        if existed:
            log.log(
                logging.INFO if planned_access is None else logging.DEBUG,  # evictions are routine
                "Token cache removed conversation %s from disk: %s.",
                conv_id,
                reason,
            )
        return existed

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[name] += n
