"""A generation entry's two JSONL files: what each line holds, how rows are written and read back, and which
files in a tree shared with the user's own runs are ours to replace (see `cache` for the layout)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import orjson

from .._core import entry
from .._core.store import TEMP_SUFFIX, unseal
from ..errors import CorruptEntryError

log = logging.getLogger(__name__)

# the fields each JSONL line holds, and their types
LINES = {
    "_completions.jsonl": {"i": int, "s": int, "prompt": str, "prompt_hash": str, "completion": str},
    "_full_texts.jsonl": {"i": int, "s": int, "full_text": str},
}
_ROW = {name for fields in LINES.values() for name in fields}  # a row once both files are read
Rows = dict[tuple[int, int], dict]  # (prompt index, sample index) -> the row


def names(stem: str) -> list[str]:
    """The data files of the entry whose manifest is `<stem>_metadata.json`."""
    return [stem + suffix for suffix in LINES]


def encode(stem: str, rows: Rows) -> dict[str, bytes]:
    """The two files' bytes: one JSON line per row, in (prompt, sample) order."""
    ordered = [rows[ik] for ik in sorted(rows)]
    return {
        stem + suffix: b"".join(orjson.dumps({x: r[x] for x in fields}) + b"\n" for r in ordered)
        for suffix, fields in LINES.items()
    }


def decode(folder: Path, stem: str, listed: Mapping[str, object]) -> Rows | None:
    """The rows of the entry `stem` in `folder` whose manifest lists `listed`, or None (logged) when its files
    are not exactly the two JSONL files, a line is malformed, or the two files hold different rows."""
    shown = f"{stem}_metadata.json"
    if sorted(listed) != sorted(names(stem)):
        log.warning(
            "Cached generations %s list files %s, not this entry's two JSONL files; regenerating.",
            shown,
            sorted(listed),
        )
        return None
    rows: Rows = {}
    try:
        for suffix, fields in LINES.items():
            for line in (folder / f"{stem}{suffix}").read_bytes().splitlines():
                row = orjson.loads(line)
                if (
                    not isinstance(row, dict)
                    or row.keys() != fields.keys()
                    or any(type(row[name]) is not kind for name, kind in fields.items())
                ):
                    raise ValueError(f"a line of {stem}{suffix} is not {sorted(fields)}")
                rows.setdefault((row["i"], row["s"]), {}).update(row)
    except (OSError, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
        log.warning("Cached generations %s are unreadable (%s); regenerating.", shown, exc)
        return None
    if any(row.keys() != _ROW for row in rows.values()):
        log.warning("Cached generations %s: the two JSONL files hold different rows; regenerating.", shown)
        return None
    return rows


def intent(meta_path: Path) -> Path:
    """Where a save records the data files it is about to write (a kill before the manifest leaves them ours)."""
    return meta_path.with_name(f".{meta_path.name}.intent{TEMP_SUFFIX}")


def foreign(meta_path: Path, names: Sequence[str]) -> str | None:
    """The first path a save would overwrite that is not ours (`meta_path` or one of `names` beside it), or None.

    A data file is ours when the manifest of ours at `meta_path` lists it (the entry this save replaces), or
    a save of ours recorded it before writing it (`intent`: that save was killed before its manifest). A
    file merely named like an entry's, in a tree the cache shares with the user, is theirs.
    """
    if not entry.replaceable(meta_path):
        return str(meta_path)
    listed: set[str] = set()
    for source in ([meta_path] if entry.is_entry_file(meta_path) else []) + [intent(meta_path)]:
        with contextlib.suppress(OSError, CorruptEntryError):
            files = unseal(source.read_bytes()).get("files")
            listed |= {n for n in files if isinstance(n, str)} if isinstance(files, (dict, list)) else set()
    for name in names:
        path = meta_path.with_name(name)
        if name not in listed and (path.exists() or path.is_symlink()):
            return str(path)
    return None
