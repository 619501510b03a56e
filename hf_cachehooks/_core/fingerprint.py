"""Fingerprints of data and files: cheap, deterministic, and never random.

A `datasets.Dataset` already carries `_fingerprint` (chained by every transform), so it is reused as is.
Other data (a list of dicts, a JSON file) is hashed as sorted JSON with xxh3: 100k rows in tens of ms.
NaN and ±inf are spelled apart from None (JSON has no spelling for them, orjson writes `null`).

Large files are hashed once and remembered by their stat stamp in a memo, a sealed entry of the
contract (`entry.py`):

    <cache root>/identity/
    └── file_hashes.json   entry "file-hashes": {"hashes": {abs path: [[size, mtime_ns, inode, ctime_ns], xxh3]}}

`st_ctime_ns` cannot be set from user space, so a file rewritten in place with its size and mtime
restored (`cp -p`, `rsync --inplace -t`) is hashed again. A corrupt or unsealed memo is rebuilt.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import xxhash

from . import entry
from .keys import dumps, hash_bytes, nonfinite_name, remember
from .store import hash_file

log = logging.getLogger(__name__)
_MEMO_KEY = {"kind": "file-hashes", "digest": "file-hashes", "inputs": {}}
_RACY_NS = 20_000_000  # a file changed within this tick of its hash could keep its stamp: not remembered
# files, memo and base -> (their stamps, the memo's stamp, the combined hash) as this process last computed it
_seen: dict[tuple, tuple[tuple, tuple | None, str]] = {}
# hashes of serialised rows seen to hold no `null` at all (so no NaN/±inf): a repeated call skips the scan,
# which costs more than the serialisation (a property of the bytes alone, so sound whatever the rows are)
_null_free: dict[str, None] = {}


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
    options = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY
    try:
        payload = orjson.dumps(data, option=options)
    except TypeError:
        return "rows:" + hash_bytes(dumps(list(data)))  # canonical() explains what it cannot hash (and spells NaN)
    digest = hash_bytes(payload)
    if digest in _null_free:
        return "rows:" + digest
    # orjson writes NaN and ±inf as null, None's spelling: only data with a null can hold one (a 1-2 GB/s
    # scan), and only then are the values walked (a cheap check first, the tagged copy only when needed)
    if b"null" not in payload:
        remember(_null_free, digest, None, 64)
    elif _has_nonfinite(data):
        return "rows:" + hash_bytes(b"nonfinite:" + orjson.dumps(_tag_nonfinite(data)[0], option=options))
    return "rows:" + digest


def _has_nonfinite(value: Any) -> bool:
    """True when `value` (rows of plain data, maybe numpy) holds a NaN or ±inf float anywhere; no copies."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str or kind is int or item is None or kind is bool:
            continue
        if kind is float:
            if item - item != 0.0:  # nan - nan and inf - inf are nan
                return True
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif getattr(getattr(item, "dtype", None), "kind", None) == "f":  # numpy arrays and scalars
            if _tag_nonfinite(item)[1]:
                return True
    return False


def _tag_nonfinite(value: Any) -> tuple[Any, bool]:
    """`value` with every NaN/±inf float replaced by its `keys.nonfinite_name`; True when there was one."""
    if isinstance(value, float):
        return (value, False) if math.isfinite(value) else (nonfinite_name(value), True)
    if isinstance(value, Mapping):
        pairs = [(k, _tag_nonfinite(v)) for k, v in value.items()]
        return {k: v for k, (v, _) in pairs}, any(f for _, (_, f) in pairs)
    if isinstance(value, (list, tuple)):
        items = [_tag_nonfinite(v) for v in value]
        return [v for v, _ in items], any(f for _, f in items)
    if hasattr(value, "tolist") and getattr(getattr(value, "dtype", None), "kind", None) == "f":  # numpy floats
        tagged, found = _tag_nonfinite(value.tolist())
        return (tagged if found else value), found
    return value, False


def example_hashes(texts: Iterable[str]) -> list[str]:
    """One 128-bit hash per model input string: the per-example key within one predictor."""
    return [xxhash.xxh3_128_hexdigest(text.encode()) for text in texts]


def hash_files(
    paths: Sequence[str | os.PathLike], memo_path: Path | None = None, base: str | os.PathLike | None = None
) -> str:
    """Hash the content of several files, each named by its path relative to `base` (default: its name).

    With `memo_path`, each file's digest is remembered by its stamp (size, mtime_ns, inode, ctime_ns),
    so an unchanged 70B checkpoint is hashed once, not on every run. Paths are handled as strings (on
    a hit, pathlib's parsing cost more than the stats): one `lstat` per file, a second `stat` for a link.
    """
    listed = tuple(str(os.fspath(p)) for p in paths)  # a folder's listing order is stable while it is unchanged
    prefix = os.path.join(os.fspath(base), "") if base is not None else None
    seen = (listed, os.fspath(memo_path) if memo_path is not None else None, prefix)
    stats = [os.lstat(path) for path in listed]  # the one stat per file (a link's target: a second one)
    stamps = tuple(_stamp_of(path, st) for path, st in zip(listed, stats))
    known_run = _seen.get(seen)
    if known_run is not None and known_run[0] == stamps and known_run[1] == _memo_stamp(memo_path):
        return known_run[2]  # every file and the memo as this process last hashed them: nothing to read
    ordered = sorted(zip(listed, stats), key=lambda item: _path_order(item[0]))
    memo = _read_memo(memo_path) if memo_path is not None else {}
    changed = False
    parts = []
    folders: dict[str, str] = {}  # each folder resolved once, not once per file
    settled = True
    for path, st in ordered:
        if stat.S_ISLNK(st.st_mode):
            st = os.stat(path)
            where = os.path.realpath(path)
        else:
            parent, name = os.path.split(path)
            folder = folders.get(parent)
            if folder is None:
                folder = folders[parent] = os.path.realpath(parent)
            where = os.path.join(folder, name)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        known = memo.get(where)
        if known and known[0] == stamp:
            digest = known[1]
        else:
            digest = hash_file(Path(path))
            if time.time_ns() - st.st_ctime_ns > _RACY_NS:  # a change in the same tick would keep the stamp
                memo[where] = [stamp, digest]
                changed = True
            else:
                settled = False
        parts.append([_relative(path, prefix, base), digest])
    if changed and memo_path is not None:
        entry.commit(memo_path, "file-hashes", _MEMO_KEY, fields={"hashes": memo})
    digest = hash_bytes(dumps(parts))
    if settled and all(time.time_ns() - s[-1] > _RACY_NS for s in stamps):
        remember(_seen, seen, (stamps, _memo_stamp(memo_path), digest), 256)
    return digest


def _stamp_of(path: str, st: os.stat_result) -> tuple[int, ...]:
    """What identifies a file's content for this process's memo: its stamp; for a link, the link's and the
    target's (a retargeted link or a target rewritten in place both move one). The last item is a ctime."""
    own = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if stat.S_ISLNK(st.st_mode):
        target = os.stat(path)
        return (*own, target.st_size, target.st_mtime_ns, target.st_ino, max(st.st_ctime_ns, target.st_ctime_ns))
    return own


def _memo_stamp(memo_path: Path | None) -> tuple[int, ...] | None:
    """The on-disk memo's stamp: when another process (or a person) rewrites it, it is read again."""
    try:
        st = os.lstat(memo_path) if memo_path is not None else None
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) if st is not None else None


def _path_order(path: str) -> tuple[str, ...]:
    """Sort key matching `Path` ordering (part by part), so the combined hash is what it always was."""
    return tuple(os.path.normpath(path).split(os.sep))


def _relative(path: str, prefix: str | None, base: str | os.PathLike | None) -> str:
    """`path` relative to `base` as a posix name (`Path.relative_to`), or the file's name without a base."""
    if prefix is None:
        return os.path.basename(path)
    if path.startswith(prefix) and os.path.normpath(path) == path:
        return path[len(prefix) :].replace(os.sep, "/")
    return Path(path).relative_to(base).as_posix()  # type: ignore[arg-type]


def _read_memo(memo_path: Path) -> dict[str, list]:
    """The remembered digests; a corrupt, unsealed or wrongly shaped memo is empty (files are rehashed)."""
    found = entry.open_entry(memo_path, kind="file-hashes", reuse=True)  # read-only below: parsed once per change
    hashes = found.doc.get("hashes") if found is not None else None
    if not isinstance(hashes, dict):
        if found is not None:
            log.warning("File-hash memo %s has the wrong shape; rehashing.", memo_path)
        return {}
    return {
        path: rec
        for path, rec in hashes.items()
        if isinstance(rec, list) and len(rec) == 2 and isinstance(rec[1], str) and isinstance(rec[0], list)
    }
