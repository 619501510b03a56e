"""Fingerprints of data and files: cheap, deterministic, and never random.

A `datasets.Dataset` already carries `_fingerprint` (chained by every transform), so it is reused as is.
Other data (a list of dicts, a JSON file) is hashed as sorted JSON with xxh3: 100k rows in tens of ms.
Large files are hashed once and remembered by (size, mtime_ns, inode) in a JSON memo.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson
import xxhash

from .keys import dumps, hash_bytes
from .store import atomic_write

log = logging.getLogger(__name__)
_CHUNK = 8 << 20


def fingerprint_data(data: Any) -> str:
    """Fingerprint a dataset: `Dataset._fingerprint` when present, else a hash of its canonical rows.

    Row order matters (predictions are positional); key order inside a row does not.

    Example:
        >>> fingerprint_data([{"q": "2+2?", "a": "4"}]) == fingerprint_data([{"a": "4", "q": "2+2?"}])
        True
    """
    existing = getattr(data, "_fingerprint", None)
    if isinstance(existing, str) and existing:
        return "datasets:" + existing
    try:
        payload = orjson.dumps(data, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:
        payload = dumps(list(data))  # canonical() explains what it cannot hash
    return "rows:" + hash_bytes(payload)


def example_hashes(texts: Iterable[str]) -> list[str]:
    """One 128-bit hash per model input string: the per-example key within one predictor."""
    return [xxhash.xxh3_128_hexdigest(text.encode()) for text in texts]


def hash_file(path: Path) -> str:
    """xxh3-128 of a file's content, read in chunks."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(paths: Sequence[Path], memo_path: Path | None = None) -> str:
    """Hash the content of several files (names relative to their folder included).

    With `memo_path`, each file's digest is remembered by (size, mtime_ns, inode), so an unchanged
    70B checkpoint is hashed once, not on every run.
    """
    memo: dict[str, Any] = {}
    if memo_path is not None:
        try:
            memo = orjson.loads(memo_path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            memo = {}
    changed = False
    parts = []
    for path in sorted(paths):
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        known = memo.get(str(Path(path).resolve()))
        if known and known[0] == stamp:
            digest = known[1]
        else:
            digest = hash_file(path)
            memo[str(Path(path).resolve())] = [stamp, digest]
            changed = True
        parts.append([Path(path).name, digest])
    if changed and memo_path is not None:
        try:
            atomic_write(memo_path, orjson.dumps(memo))
        except OSError as exc:
            log.debug("Cannot save file-hash memo %s: %s", memo_path, exc)
    return hash_bytes(dumps(parts))
