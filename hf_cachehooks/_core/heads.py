"""An entry's head: its kind, key digest and `summary`, read from a manifest's first bytes (ls, du, prune).

    {"hf_cachehooks_entry": 1,
     "kind": "conversation",
     "summary": {"model": "org/tiny", "items": 812, "bytes": 1048576, "created": 1764547200.0,
                 "last_used": 1764550000.0, "pinned": true},
     "key": {"kind": "conversation",
             "digest": "…",                  the head ends here: the rest is never read
             "inputs": {…}},
     …}

One open and one read per manifest. A manifest that fits in that read (most do) is also checked by its
seal, shape and file records (no file is stat'ed); a longer one is trusted by its head: the summary is
informational, and `verify` hashes everything.
A manifest written before summaries existed is parsed whole and summarised by the same kind functions
(`kinds.summary_of`), its files' sizes checked on disk. Last use is the contract's rule: the summary's
`last_used`, or later the mtime of the `.last_access` file that reads touch in the entry's folder, for
the kinds registered in `kinds.TOUCHED_BY_READS`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import orjson

from ..errors import CorruptEntryError
from .entry import MARK, OWN_HIDDEN, check_name, inspect, record_problem, shape_problem
from .kinds import TOUCHED_BY_READS, summary_of
from .store import unseal

HEAD_BYTES = 1 << 12
_KEY_START = b'\n  "key": {\n    "kind": '
_DIGEST = b'\n    "digest": '
_TOUCH = OWN_HIDDEN[0]  # ".last_access"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # a link or a pipe is never an entry


@dataclass(frozen=True)
class Head:
    """What management needs of one entry: `size` is the bytes on disk (the manifest and every file it lists)."""

    path: Path
    kind: str
    digest: str
    summary: dict[str, Any]
    size: int
    last_used: float

    @property
    def created(self) -> float:
        return float(self.summary["created"])


def _sound(summary: Any) -> TypeGuard[dict[str, Any]]:
    """True for a summary of the contract's shape (anything else is recomputed from the whole manifest)."""
    return (
        isinstance(summary, dict)
        and isinstance(summary.get("model"), str)
        and type(summary.get("items")) is int
        and type(summary.get("bytes")) is int
        and type(summary.get("created")) in (int, float)
        and type(summary.get("last_used")) in (int, float)
    )


def last_used(path: Path, kind: str, summary: dict[str, Any]) -> float:
    """When the entry at `path` was last used: its summary's `last_used`, or a later read's `.last_access`."""
    last = float(summary["last_used"])
    if kind in TOUCHED_BY_READS:
        try:
            last = max(last, os.stat(path.parent / _TOUCH).st_mtime)
        except OSError:
            pass
    return last


def head_of(path: Path, doc: dict[str, Any], manifest_bytes: int, touched: bool = True) -> Head:
    """The head of a parsed manifest whose reserved fields are sound (its summary, or one computed now).

    `touched`: count a read's `.last_access` beside it (not for a remote root's manifests).
    """
    summary = doc.get("summary")
    if not _sound(summary):
        summary = summary_of(doc)
    kind = doc["kind"]
    used = last_used(path, kind, summary) if touched else float(summary["last_used"])
    return Head(path, kind, doc["key"]["digest"], summary, summary["bytes"] + manifest_bytes, used)


def _whole(path: Path) -> Head | None:
    """A manifest without a summary (or with a broken head): parsed whole, its files' sizes checked."""
    found, _ = inspect(path, check="size")
    if found is None:
        return None
    try:
        size = os.stat(path).st_size
    except OSError:
        return None
    return head_of(path, {**found.doc, "summary": None}, size)  # its sizes were checked: the records hold


def _from_head(path: Path, raw: bytes, size: int) -> Head | None:
    """The head from the first bytes of a long manifest, or None when they are not laid out as `commit` writes."""
    start = raw.find(_KEY_START, len(MARK))
    at = raw.find(_DIGEST, start)
    end = raw.find(b"\n", at + len(_DIGEST))
    if start < 0 or at < 0 or end < 0 or raw.count(b"\n", start + len(_KEY_START), at) != 0:
        return None
    try:
        top = orjson.loads(raw[:start].rstrip(b",") + b"}")  # {"hf_cachehooks_entry", "kind", "summary"}
        digest = orjson.loads(raw[at + len(_DIGEST) : end].rstrip(b","))
    except orjson.JSONDecodeError:
        return None
    kind, summary = top.get("kind"), top.get("summary")
    if not isinstance(kind, str) or not isinstance(digest, str) or not _sound(summary):
        return None
    return Head(path, kind, digest, summary, summary["bytes"] + size, last_used(path, kind, summary))


def _records_problem(files: dict) -> bool:
    """True when a file name or record is malformed (what `inspect` refuses before it stats anything)."""
    try:
        return any(record_problem(check_name(name), rec) for name, rec in files.items())
    except CorruptEntryError:
        return True


def read_summary(path: Path) -> Head | None:
    """The head of the manifest at `path` from one read of its first bytes; None when it is not a readable entry.

    Never for serving data (`entry.open_entry` checks an entry whole): for listing, sizing and pruning.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        raw = os.read(fd, HEAD_BYTES) if stat.S_ISREG(st.st_mode) else b""
    except OSError:
        return None
    finally:
        os.close(fd)
    if not raw.startswith(MARK):
        return None
    if len(raw) < HEAD_BYTES:  # the whole manifest: its seal is checked too (cheap at this size)
        try:
            doc = unseal(raw)
        except CorruptEntryError:
            return None
        if shape_problem(doc) is not None or _records_problem(doc["files"]):
            return None
        summary = doc.get("summary")
        if not _sound(summary):
            return _whole(path)
        return Head(
            path,
            doc["kind"],
            doc["key"]["digest"],
            summary,
            summary["bytes"] + len(raw),
            last_used(path, doc["kind"], summary),
        )
    return _from_head(path, raw, st.st_size) or _whole(path)


_KEY_OPEN = b'\n  "key": '
_KEY_END = b'\n  },\n  "created_at": '  # the only object closed at the top level's indent right before created_at


def read_head(path: Path) -> tuple[str, dict] | None:
    """(kind, key) of the manifest at `path`, read from its first bytes, without checking the rest.

    For explaining a miss only (which fields differ from the closest entry): never for serving data,
    which `open_entry` checks whole. A manifest laid out otherwise is parsed whole; None when it is
    not a readable entry.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read(HEAD_BYTES)
            end = raw.find(_KEY_END)
            if end < 0 and len(raw) == HEAD_BYTES:  # a key larger than the head: read on
                raw += handle.read()
                end = raw.find(_KEY_END)
    except OSError:
        return None
    if not raw.startswith(MARK):
        return None
    start = raw.find(_KEY_OPEN, len(MARK))
    try:
        if 0 < start < end:
            kind = orjson.loads(raw[:start].rstrip(b",") + b"}").get("kind")  # the fields before key (kind, summary)
            key = orjson.loads(raw[start + len(_KEY_OPEN) : end + 4])
            if isinstance(kind, str) and isinstance(key, dict):
                return kind, key
        found, _ = inspect(path, check="manifest")
    except (orjson.JSONDecodeError, ValueError):
        found, _ = inspect(path, check="manifest")
    return (found.kind, found.key) if found is not None else None
