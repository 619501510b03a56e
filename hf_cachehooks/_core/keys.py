"""Cache keys: a hash over a canonical serialisation of the key's inputs plus a format version.

The inputs are a nested dict of plain values. They are stored next to every entry so that a miss can
say which field changed (`diff_inputs`) and `hf-cachehooks explain` can show it. NaN and ±inf, which
JSON cannot spell (orjson writes `null`, None's spelling), become {"$float": "nan"}, {"$float": "inf"}
and {"$float": "-inf"}: never a string's or None's spelling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import orjson
import xxhash

from ..errors import ConfigError

# Bump when the meaning of any key input changes: every old entry becomes a miss.
FORMAT_VERSION = 1


def canonical(value: Any) -> Any:
    """Return `value` as plain JSON data with one spelling per meaning.

    Dict keys are strings (sorted at serialisation), tuples become lists, integral floats become
    ints (`0.0` and `0` are the same temperature), NaN/±inf become `nonfinite_name` tags (never
    None's `null`), paths become strings. Anything else raises
    rather than falling back to a repr that could hold a memory address.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return nonfinite_name(value)
        return int(value) if value == int(value) else value
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(canonical(v) for v in value)
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return canonical(value.item())
    raise ConfigError(
        f"Cannot use {type(value).__name__} value {value!r:.80} in a cache key. "
        "Pass plain JSON data (str, int, float, bool, list, dict)."
    )


def nonfinite_name(value: float) -> dict[str, str]:
    """How a key spells a float JSON cannot: {"$float": "nan"}, {"$float": "inf"} or {"$float": "-inf"}."""
    return {"$float": repr(float(value))}


def dumps(value: Any) -> bytes:
    """Serialise canonical data to sorted, compact JSON bytes."""
    return orjson.dumps(canonical(value), option=orjson.OPT_SORT_KEYS)


def remember(memo: dict, key: Any, value: Any, limit: int) -> None:
    """Store `value` under `key` in a process memo of at most `limit` entries (the oldest goes first)."""
    if key not in memo and len(memo) >= limit:
        memo.pop(next(iter(memo)))
    memo[key] = value


def hash_bytes(data: bytes | memoryview) -> str:
    """A 128-bit xxh3 hex digest: fast, and plenty against accidental collisions."""
    return xxhash.xxh3_128_hexdigest(data)


@dataclass(frozen=True)
class Key:
    """A cache key: `digest` identifies the entry; `inputs` say what it was made from."""

    kind: str
    inputs: dict
    digest: str

    @property
    def short(self) -> str:
        return self.digest[:12]


def make_key(kind: str, inputs: Mapping[str, Any]) -> Key:
    """Hash `inputs` (with the format version and kind) into a `Key`.

    Example:
        >>> make_key("predictions", {"gen": {"temperature": 0.0}}).digest == \\
        ...     make_key("predictions", {"gen": {"temperature": 0}}).digest
        True
    """
    return _key_of_plain(kind, canonical(inputs))


def extend_key(base: Key, kind: str, extra: Mapping[str, Any]) -> Key:
    """`make_key(kind, {**base.inputs, **extra})`, without walking `base`'s inputs again (they are canonical).

    Example:
        >>> base = make_key("predictor", {"model": {"name": "m"}})
        >>> extend_key(base, "predictions", {"n": 3.0}) == make_key("predictions", {"model": {"name": "m"}, "n": 3})
        True
    """
    return _key_of_plain(kind, {**base.inputs, **canonical(extra)})


def _key_of_plain(kind: str, plain: dict) -> Key:
    """The key of inputs already in canonical form (`canonical` is idempotent: no second walk)."""
    digest = hash_bytes(
        orjson.dumps({"format": FORMAT_VERSION, "kind": kind, "inputs": plain}, option=orjson.OPT_SORT_KEYS)
    )
    return Key(kind=kind, inputs=plain, digest=digest)


def flatten(inputs: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted paths: {"gen": {"top_p": 1}} -> {"gen.top_p": 1}."""
    flat: dict[str, Any] = {}
    for name, value in inputs.items():
        path = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def diff_inputs(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Describe each dotted field that differs between two key inputs, e.g. `gen.max_new_tokens 32→64`."""
    a, b = flatten(canonical(old)), flatten(canonical(new))
    changes = []
    for path in sorted(a.keys() | b.keys()):
        if a.get(path, "<absent>") != b.get(path, "<absent>"):
            changes.append(f"{path} {_short(a.get(path, '<absent>'))}→{_short(b.get(path, '<absent>'))}")
    return changes


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text if len(text) <= 24 else text[:10] + "…" + text[-8:]
