"""A conversation's bytes on disk: validated ids, the cache settings, the manifest's shape, and per turn two
safetensors files.

A turn's `turn-NNNNN.safetensors` holds token_ids (T,) and hidden (T, L, H) and is memory-mapped on read;
its `lens-NNNNN.safetensors` holds topk_ids and topk_probs (T, L, K), written with the turn or later (the
chat server computes the lens after the reply) and read whole (it is about 5% of the turn). Both are listed
in the conversation's manifest (an entry of kind "conversation", see `entry`) with size and xxh3, and are
checked against it on every read from disk: a file that does not match is never served.

Split from `token_cache` (the tiers and eviction) so each stays readable. Never pickle.
"""

from __future__ import annotations

import logging
import mmap
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .._core import entry
from .._core.cache_config import DEFAULT_MAX_AGE, CacheConfig, duration, seconds, settle, warn_deprecated
from .._core.freshness import parse_duration
from ..errors import ConfigError, CorruptEntryError, MissingDependencyError

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: conversation.json is an entry-contract manifest listing every file
KIND = "conversation"
CONV_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MANIFEST = "conversation.json"
TOUCH = ".last_access"
TOUCH_EVERY = 1.0  # seconds between last-access stamps of one conversation: reads stay (nearly) write-free
MAX_TURNS = 512  # turns the memory tier holds at most: each mapped turn keeps a file descriptor open
_GIB = 1024**3
_MEMORY_TTL = timedelta(hours=1)  # a turn's time in the memory tier, by default
_NONE = timedelta(0)
SUFFIX = {"none": ".safetensors", "lz4": ".safetensors.lz4", "zstd": ".safetensors.zst"}
_PACKAGE = {"lz4": "lz4", "zstd": "zstandard"}
_DTYPES: dict[str, np.dtype] = {
    "I32": np.dtype("int32"),
    "F16": np.dtype("float16"),
    "U16": np.dtype("uint16"),
    "F32": np.dtype("float32"),
}
# The lens's per-layer figures stored beside its top-k (a turn's `stats`, (T, L, 4) float32): entropy of the layer's
# distribution and KL(final layer || this layer), in nats; probability and 0-based rank of the token that came next
# (NaN for a turn's last token until the next turn exists: the server computes those few on the spot).
STATS = ("entropy", "kl_to_final", "next_prob", "next_rank")
_HIDDEN_CODE = {"float16": "F16", "bfloat16": "U16"}  # bf16 travels as its raw 16 bits


def validate_conv_id(conv_id: object) -> str:
    """Return `conv_id` if it is 1-64 characters of [A-Za-z0-9_-]; checked before any path is built.

    Raises:
        ConfigError: for anything else (path separators, `..`, empty, over-long, NUL, not a string).
    """
    if not isinstance(conv_id, str) or not CONV_ID.fullmatch(conv_id):
        raise ConfigError(f"Invalid conversation id {conv_id!r}: use 1-64 characters from A-Z, a-z, 0-9, '_' and '-'.")
    return conv_id


@dataclass(frozen=True)
class TokenCacheConfig:
    """Sizes, place, codec and lifetimes of the token cache: the `cache:` YAML block as data.

    Args:
        memory_max_bytes, disk_max_bytes: the two tiers' size limits.
        compression: "none", "lz4" or "zstd": whole turn files, decoded per turn (fp16 gains 2-9%).
        prefetch_range: neighbours a client should prefetch on each side of a clicked token.
        memory_ttl: a turn leaves the memory tier this long after it was stored (None: never).
        cache: the disk tier's settings as one `CacheConfig`: `folder` (else `<root>/conversations`),
            `max_age` (how long a conversation may sit unread before eviction deletes it; left out: 7
            days), `lock_stale_after` and `clock`. Conversations are stored, not recomputed, so
            `force_recompute=True` and `enabled=False` are refused. Read `resolved_cache` for the
            settings in effect; equality compares those, whichever spelling built them.
        directory, disk_ttl_seconds, memory_ttl_seconds: deprecated (a `FutureWarning`, once per process):
            pass `cache=CacheConfig(folder=..., max_age=timedelta(...))` and `memory_ttl=timedelta(...)`.

    Raises:
        ConfigError: a negative size, an unknown codec, a keyword that disagrees with `cache` (or
            `memory_ttl_seconds` with `memory_ttl`), or a `cache` asking to recompute or to be disabled.

    Example:
        >>> TokenCacheConfig(memory_max_bytes=256 * 2**20, compression="none").prefetch_range
        5
        >>> TokenCacheConfig(cache=CacheConfig(folder="conversations", max_age=timedelta(days=1))).memory_ttl
        datetime.timedelta(seconds=3600)
    """

    memory_max_bytes: int = _GIB
    disk_max_bytes: int = 10 * _GIB
    directory: str | None = field(default=None, compare=False)
    compression: str = "none"
    prefetch_range: int = 5
    memory_ttl: timedelta | None = _MEMORY_TTL
    memory_ttl_seconds: float | None = field(default=3600.0, compare=False)
    disk_ttl_seconds: float | None = field(default=seconds(DEFAULT_MAX_AGE["TokenCacheConfig"]), compare=False)
    cache: CacheConfig | None = field(default=None, compare=False)
    resolved_cache: CacheConfig = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.compression not in SUFFIX:
            raise ConfigError(f"Unknown compression {self.compression!r}; use one of {', '.join(SUFFIX)}.")
        for name in ("memory_max_bytes", "disk_max_bytes", "prefetch_range"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} is {getattr(self, name)}; it must be 0 or more.")
        if self.memory_ttl_seconds != 3600.0:  # the older spelling, set
            warn_deprecated("TokenCacheConfig", "memory_ttl_seconds=...", "memory_ttl=timedelta(seconds=...)")
            old = None if self.memory_ttl_seconds is None else duration(self.memory_ttl_seconds)
            if self.memory_ttl != _MEMORY_TTL and self.memory_ttl != old:
                raise ConfigError(
                    f"TokenCacheConfig got memory_ttl={self.memory_ttl!r} and memory_ttl_seconds="
                    f"{self.memory_ttl_seconds!r}; set it in one place: memory_ttl=timedelta(...)."
                )
            object.__setattr__(self, "memory_ttl", old)
        if self.memory_ttl is not None and (not isinstance(self.memory_ttl, timedelta) or self.memory_ttl < _NONE):
            raise ConfigError(
                f"TokenCacheConfig memory_ttl={self.memory_ttl!r} is not a duration; pass a positive "
                "datetime.timedelta, e.g. timedelta(hours=1), or None (turns stay until evicted)."
            )
        keywords = {"directory": self.directory, "disk_ttl_seconds": self.disk_ttl_seconds}
        defaults = {f.name: f.default for f in fields(self) if f.name in keywords}
        cache = settle(self.cache, keywords, defaults, "TokenCacheConfig")
        for flag, bad in (("force_recompute", True), ("enabled", False)):
            if getattr(cache, flag) is bad:
                raise ConfigError(
                    f"TokenCacheConfig got CacheConfig({flag}={bad}): conversations are stored, not "
                    "recomputed; leave it at its default (delete conversations with TokenCache.delete)."
                )
        object.__setattr__(self, "resolved_cache", cache)

    @classmethod
    def from_yaml_dict(cls, doc: Mapping[str, Any]) -> TokenCacheConfig:
        """Read the chat server's YAML structure (already parsed): `cache: {memory, disk, prefetch, ttl}`.

        `ttl.memory` and `ttl.disk` are durations with a unit (`30m`, `12h`, `7d`, `2w`; null: never). The
        older `ttl.memory_minutes` and `ttl.disk_days` still take a plain number in their unit.

        Raises:
            ConfigError: for an unknown key, eviction policy or duration, or a ttl given in both spellings.

        Example:
            >>> TokenCacheConfig.from_yaml_dict({"cache": {"disk": {"max_size_gb": 2}}}).disk_max_bytes
            2147483648
            >>> TokenCacheConfig.from_yaml_dict({"cache": {"ttl": {"disk": "12h"}}}).resolved_cache.max_age
            datetime.timedelta(seconds=43200)
        """
        block = doc.get("cache", doc)
        allowed = {
            "memory": {"max_size_mb", "eviction_policy"},
            "disk": {"max_size_gb", "directory", "compression"},
            "prefetch": {"enabled", "range"},
            "ttl": {"memory", "disk", "memory_minutes", "disk_days"},
        }
        for section, value in block.items():
            unknown = set(value or {}) - allowed[section] if section in allowed else {section}
            if unknown:
                raise ConfigError(f"Unknown cache setting(s) {sorted(unknown)} in {section!r}; known: {allowed}.")
        memory, disk = block.get("memory") or {}, block.get("disk") or {}
        prefetch, ttl = block.get("prefetch") or {}, block.get("ttl") or {}
        if memory.get("eviction_policy", "lru") != "lru":
            raise ConfigError(f"eviction_policy {memory['eviction_policy']!r} is not supported; use lru.")
        folder = None if disk.get("directory") is None else str(disk["directory"])
        return cls(
            memory_max_bytes=int(memory.get("max_size_mb", 1024) * 2**20),
            disk_max_bytes=int(disk.get("max_size_gb", 10) * _GIB),
            compression=str(disk.get("compression", "none")),
            prefetch_range=int(prefetch.get("range", 5)) if prefetch.get("enabled", True) else 0,
            memory_ttl=_yaml_ttl(ttl, "memory", "memory_minutes", timedelta(minutes=1), _MEMORY_TTL),
            cache=CacheConfig(
                folder=folder,
                max_age=_yaml_ttl(ttl, "disk", "disk_days", timedelta(days=1), DEFAULT_MAX_AGE["TokenCacheConfig"]),
            ),
        )


def _yaml_ttl(
    ttl: Mapping[str, Any], name: str, old: str, unit: timedelta, default: timedelta | None
) -> timedelta | None:
    """`ttl.<name>` (a duration with a unit) or `ttl.<old>` (a number in `unit`); null: never."""
    if name in ttl and old in ttl:
        raise ConfigError(f"ttl.{name} and ttl.{old} set the same limit; keep ttl.{name} (e.g. {name}: 7d).")
    if name in ttl:
        value, number_unit = ttl[name], None
    elif old in ttl:
        value, number_unit = ttl[old], unit
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            return None  # a negative number of days or minutes never expired: it still does not
    else:
        return default
    try:
        return None if value is None else parse_duration(value, number_unit)
    except ConfigError as exc:
        raise ConfigError(f"ttl.{name if name in ttl else old}: {exc}") from None


@dataclass(frozen=True, eq=False)
class TokenRecord:
    """One cached token: its id and, for every layer, the hidden state and the lens's top-k predictions.

    Arrays are read-only views into the cached turn; copy them before changing them.
    """

    conv_id: str
    index: int
    token_id: int
    topk_ids: np.ndarray | None  # (layers, k) int32; None while the turn's lens is still being computed
    topk_probs: np.ndarray | None  # (layers, k) float16; None likewise
    hidden: np.ndarray  # (layers, hidden) float16, or uint16 bf16 bits when hidden_dtype == "bfloat16"
    hidden_dtype: str = "float16"
    stats: np.ndarray | None = None  # (layers, 4) float32: entropy, kl_to_final, next_prob, next_rank (see STATS)


class CorruptTurn(CorruptEntryError):
    """A turn file disagrees with its manifest (truncated, edited, replaced); always caught: a miss."""


def codec(name: str) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]] | None:
    """(compress, decompress) for a codec name; None for "none"."""
    try:
        if name == "lz4":
            import lz4.frame

            return lz4.frame.compress, lz4.frame.decompress
        if name == "zstd":
            import zstandard

            return zstandard.ZstdCompressor(level=3).compress, zstandard.ZstdDecompressor().decompress
    except ImportError as exc:
        raise MissingDependencyError(
            f"compression={name!r} needs {_PACKAGE[name]}: pip install 'hf_cachehooks[compression]' "
            f"(or pip install {_PACKAGE[name]}), or set compression to none."
        ) from exc
    return None


def check_turn(
    token_ids: Any, hidden: Any, topk_ids: Any = None, topk_probs: Any = None
) -> tuple[dict[str, np.ndarray], str]:
    """Read-only contiguous copies in the stored dtypes (the lens arrays only when given), and the hidden dtype tag."""
    hid = np.asarray(hidden)
    tag = {np.dtype(np.float16): "float16", np.dtype(np.uint16): "bfloat16"}.get(hid.dtype)
    if tag is None or hid.ndim != 3 or hid.shape[0] == 0:
        raise ConfigError(
            f"hidden must be (tokens > 0, layers, hidden) float16, or uint16 holding bfloat16 bits "
            f"(tensor.view(torch.uint16).numpy()); got {hid.dtype} {hid.shape}."
        )
    ids = np.asarray(token_ids)
    if ids.shape != hid.shape[:1] or not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(
            f"token_ids must be integers of shape {hid.shape[:1]} (one per row of hidden); got {ids.dtype} {ids.shape}."
        )
    arrays = {"token_ids": np.array(ids, np.int32, order="C"), "hidden": np.array(hid, order="C")}  # own C copies:
    for array in arrays.values():  # safetensors writes raw memory, strides ignored
        array.setflags(write=False)
    if (topk_ids is None) != (topk_probs is None):
        raise ConfigError("Pass both topk_ids and topk_probs, or neither (and add the lens later with add_lens).")
    if topk_ids is not None:
        arrays.update(check_lens(topk_ids, topk_probs, hid.shape[0], hid.shape[1]))
    return arrays, tag


def check_lens(topk_ids: Any, topk_probs: Any, tokens: int, layers: int, stats: Any = None) -> dict[str, np.ndarray]:
    """Read-only int32 / float16 copies of a turn's lens, (tokens, layers, k) each, and its float32 `stats`
    (tokens, layers, 4) when given."""
    top, probs = np.asarray(topk_ids), np.asarray(topk_probs)
    if top.ndim != 3 or top.shape[:2] != (tokens, layers) or top.shape[2] == 0 or probs.shape != top.shape:
        raise ConfigError(
            f"topk_ids {top.shape} and topk_probs {probs.shape} must both be (T={tokens}, "
            f"L={layers}, K>0), one row per token and layer of the turn."
        )
    if not np.issubdtype(top.dtype, np.integer) or not np.issubdtype(probs.dtype, np.floating):
        raise ConfigError(f"topk_ids must be integers and topk_probs floats; got {top.dtype} and {probs.dtype}.")
    arrays: dict[str, np.ndarray] = {
        "topk_ids": np.array(top, np.int32, order="C"),
        "topk_probs": np.array(probs, np.float16, order="C"),
    }
    if stats is not None:
        figures = np.asarray(stats)
        if figures.shape != (tokens, layers, len(STATS)) or not np.issubdtype(figures.dtype, np.floating):
            raise ConfigError(
                f"stats must be floats of shape (T={tokens}, L={layers}, {len(STATS)}); got "
                f"{figures.dtype} {figures.shape}."
            )
        arrays["stats"] = np.array(figures, np.float32, order="C")
    for array in arrays.values():
        array.setflags(write=False)
    return arrays


def manifest_problem(doc: Any, conv_id: str) -> str | None:
    """Why an unsealed `conversation.json` cannot be served as conversation `conv_id`; None when it can.

    Checks the contract's fields, this cache's kind and format, that the manifest names this very
    conversation (a folder renamed or swapped with another holds someone else's manifest), that every
    turn's files are listed as plain names, and the type of every field a read uses: a resealed manifest
    of the wrong shape is a miss, never an AttributeError or TypeError.
    """
    problem = entry.shape_problem(doc)
    if problem:
        return problem
    if doc["kind"] != KIND or doc.get("format") != FORMAT_VERSION:
        return f"a {doc['kind']!r} entry of format {doc.get('format')!r}, not a conversation of format {FORMAT_VERSION}"
    if doc.get("conv_id") != conv_id:
        return f"it is the manifest of conversation {str(doc.get('conv_id'))!r:.80} (folders renamed or swapped?)"
    if not isinstance(doc.get("uid"), str) or doc["key"]["digest"] != doc["uid"]:
        return "its uid does not match its key"
    if (
        not all(_count(doc.get(n), 1) for n in ("layers", "hidden"))
        or not _count(doc.get("tokens"), 0)
        or doc.get("hidden_dtype") not in _HIDDEN_CODE
        or not isinstance(doc.get("pinned"), bool)
        or not isinstance(doc.get("meta"), dict)
        or not (doc.get("k") is None or _count(doc["k"], 1))
        or not isinstance(doc.get("turns"), list)
        or not _number(doc.get("last_access", 0))
    ):
        return "fields tokens/layers/hidden/hidden_dtype/pinned/meta/k/turns/last_access are missing or mistyped"
    try:
        for name in doc["files"]:
            entry.check_name(name)
    except CorruptEntryError as exc:
        return str(exc)
    start = 0
    for turn_no, turn in enumerate(doc["turns"]):
        problem = _turn_problem(turn, start, doc["k"], doc["files"])
        if problem:
            return f"turn {turn_no}: {problem}"
        start += turn["count"]
    return None if start == doc["tokens"] else f"its turns hold {start} tokens, its tokens field says {doc['tokens']}"


def _count(value: Any, least: int) -> bool:
    return type(value) is int and value >= least


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _turn_problem(turn: Any, start: int, k: int | None, files: dict) -> str | None:
    if (
        not isinstance(turn, dict)
        or turn.get("start") != start
        or not _count(turn.get("count"), 1)
        or turn.get("compression") not in SUFFIX
        or not _number(turn.get("created_at"))
        or turn.get("k") not in (None, k)
        or (turn.get("lens_file") is not None and turn.get("k") is None)
    ):
        return f"malformed ({str(turn)[:120]})"
    for name_field, bytes_field in (("file", "bytes"), ("lens_file", "lens_bytes")):
        name, size = turn.get(name_field), turn.get(bytes_field)
        if name is None and name_field == "lens_file":
            continue
        record = files.get(name) if isinstance(name, str) else None
        if not isinstance(record, dict) or not _count(size, 0) or record.get("bytes") != size:
            return f"its {name_field} {str(name)!r:.80} is not listed in the manifest's files with its size"
    return None


def read_turn(folder: Path, doc: dict, turn_no: int, rows: slice | None) -> dict[str, np.ndarray]:
    """The whole turn (rows None) or copies of some tokens' rows, each file checked against the manifest.

    Without a lens file yet, or with one that does not check out (logged), the result has no topk_ids /
    topk_probs: the chat server then computes the lens again, never serves a damaged one.
    """
    turn, layers = doc["turns"][turn_no], doc["layers"]
    t, tag = turn["count"], _HIDDEN_CODE[doc["hidden_dtype"]]
    out = _read_part(
        folder / turn["file"],
        turn,
        doc["files"][turn["file"]],
        doc["uid"],
        f"{turn_no}",
        {"token_ids": ("I32", [t]), "hidden": (tag, [t, layers, doc["hidden"]])},
        rows,
        mapped=True,
    )
    if turn.get("lens_file"):
        shape, path = [t, layers, turn["k"]], folder / turn["lens_file"]
        expect = {"topk_ids": ("I32", shape), "topk_probs": ("F16", shape)}
        if turn.get("stats") is True:
            expect["stats"] = ("F32", [t, layers, len(STATS)])
        try:
            out.update(
                _read_part(
                    path,
                    turn,
                    doc["files"][turn["lens_file"]],
                    doc["uid"],
                    f"{turn_no}-lens",
                    expect,
                    rows,
                    mapped=False,
                )
            )
        except (OSError, ValueError, TypeError, KeyError, struct.error, CorruptTurn) as exc:
            log.warning(
                "Cannot read the cached lens %s (%s); serving turn %d without it (its lens is computed again).",
                path,
                exc,
                turn_no,
            )
    return out


def turn_nbytes(doc: dict, turn_no: int) -> int:
    """Bytes of the arrays `read_turn` returns for a whole turn (what the memory tier counts): per token its id
    and (L, H) hidden state and, once its lens file is stored, (L, K) top-k ids and probabilities and, when
    recorded, (L, len(STATS)) stats."""
    turn, layers = doc["turns"][turn_no], doc["layers"]
    i32, f16, f32 = (_DTYPES[code].itemsize for code in ("I32", "F16", "F32"))
    per_token = i32 + layers * doc["hidden"] * _DTYPES[_HIDDEN_CODE[doc["hidden_dtype"]]].itemsize
    if turn.get("lens_file"):
        per_token += layers * turn["k"] * (i32 + f16) + (layers * len(STATS) * f32 if turn.get("stats") is True else 0)
    return turn["count"] * per_token


def _read_part(
    path: Path,
    turn: dict,
    record: dict,
    uid: str,
    part: str,
    expect: dict[str, tuple[str, list[int]]],
    rows: slice | None,
    mapped: bool,
) -> dict[str, np.ndarray]:
    """One safetensors file of a turn, checked against its manifest `record` (size, then content by the
    contract's rule). Uncompressed and `mapped`, it is memory-mapped, so promoting it costs no copy: its
    arrays are views of the page cache. Files are only ever replaced by rename, never changed in place, so
    a file that checked out stays true while mapped.
    """
    codecs = codec(turn["compression"])
    with open(path, "rb") as handle:  # FileNotFoundError: deleted meanwhile, the caller's quiet miss
        if problem := entry.check_file(path.parent, path.name, record):  # size; content by the contract's rule
            raise CorruptTurn(problem)
        if codecs is None and mapped:
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            mapping.madvise(mmap.MADV_RANDOM)  # a click reads one token's rows: no read-ahead of the whole turn
            raw: bytes | mmap.mmap = mapping
        elif codecs is None:
            raw = handle.read()
        else:
            try:
                raw = codecs[1](handle.read())
            except Exception as exc:  # each codec raises its own error type
                raise CorruptTurn(f"cannot decompress ({exc})") from exc
    view, size = memoryview(raw), len(raw)
    (head_len,) = struct.unpack("<Q", view[:8])  # struct.error / ValueError: the caller's miss
    header = orjson.loads(bytes(view[8 : 8 + head_len])) if head_len <= min(size - 8, 1 << 20) else None
    meta = header.get("__metadata__") or {} if isinstance(header, dict) else {}
    if not isinstance(header, dict) or meta.get("uid") != uid or meta.get("turn") != part:
        raise CorruptTurn("header missing, or written for another conversation or turn")
    out = {}
    for name, (code, shape) in expect.items():
        tensor, dtype = header.get(name) or {}, _DTYPES[code]
        begin, end = (tensor.get("data_offsets") or [0, -1])[:2]
        if (
            tensor.get("dtype") != code
            or tensor.get("shape") != shape
            or begin < 0
            or end - begin != dtype.itemsize * int(np.prod(shape))
            or 8 + head_len + end > size
        ):
            raise CorruptTurn(f"tensor {name} does not match the manifest ({tensor})")
        array = np.frombuffer(view[8 + head_len + begin : 8 + head_len + end], dtype).reshape(shape)
        out[name] = array if rows is None else array[rows].copy()  # a copy lets the mapping go
    return out
