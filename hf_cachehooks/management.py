"""Look after a cache folder: list, size, prune by age, clear, verify checksums, explain misses.

Deleting is two steps, as in huggingface_hub: build a `Plan` (what would go, how many bytes), then
`execute()` it; `--dry-run` prints the plan only.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from .errors import ConfigError, CorruptEntryError
from .keys import diff_inputs
from .store import unseal

_NOT_ENTRIES = {"last_miss.json", "predictor.json", "file_hashes.json"}  # sealed bookkeeping, not results
_UNSEALED = {"file_hashes.json"}  # a plain JSON memo, rebuilt when unreadable
_TEMP_GRACE = 3600.0  # a temp file older than this belongs to a dead writer


@dataclass(frozen=True)
class EntryInfo:
    """One cache entry as `ls` shows it."""

    kind: str
    model: str
    path: Path
    size: int
    created_at: float
    key: str
    examples: int


@dataclass
class Plan:
    """Paths a delete would remove, with the bytes it frees. Nothing happens until `execute()`."""

    paths: list[Path] = field(default_factory=list)
    size: int = 0

    def add(self, path: Path) -> None:
        self.paths.append(path)
        self.size += _size(path)

    def execute(self) -> int:
        """Delete the planned paths; return how many were removed."""
        removed = 0
        for path in self.paths:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
        return removed


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    try:
        return path.stat().st_size
    except OSError:
        return 0


def kinds(root: Path) -> list[str]:
    """The cache kinds present under `root` (one folder each)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def _kind_dirs(root: Path, kind: str | None) -> list[Path]:
    present = kinds(root)
    if kind is not None and kind not in present:
        raise ConfigError(f"No cache kind {kind!r} under {root} (present: {', '.join(present) or 'none'}).")
    return [root / k for k in present if kind in (None, k)]


def _entry_files(folder: Path, bookkeeping: bool = False) -> Iterator[Path]:
    skip = _UNSEALED if bookkeeping else _NOT_ENTRIES
    for path in sorted(folder.rglob("*.json")):
        if path.name not in skip and ".locks" not in path.parts:
            yield path


def _peek(path: Path) -> dict | None:
    """Read a sealed file for display; unlike the caches, management never deletes what it cannot read."""
    try:
        return unseal(path.read_bytes())
    except (OSError, CorruptEntryError):
        return None


def list_entries(root: Path, kind: str | None = None) -> list[EntryInfo]:
    """Every run entry and per-example shard folder, newest first."""
    infos = []
    for folder in _kind_dirs(root, kind):
        for path in sorted(folder.glob("*.json")):
            if path.name in _NOT_ENTRIES:
                continue
            doc = _peek(path)
            if doc is None:
                continue  # `verify` reports it
            meta = doc.get("metadata", {})
            model = meta.get("model_name") or doc.get("model", {}).get("name", "?")
            infos.append(EntryInfo(folder.name, model, path,
                                   _size(path), meta.get("created_at", path.stat().st_mtime),
                                   doc.get("key", {}).get("digest", doc.get("digest", ""))[:12],
                                   meta.get("dataset_size", 0)))
        for shard_dir in sorted((folder / "examples").glob("*")) if (folder / "examples").is_dir() else []:
            head = _peek(shard_dir / "predictor.json") or {}
            stamps = [p.stat().st_mtime for p in shard_dir.glob("*.json")]
            infos.append(EntryInfo(f"{folder.name}/examples", head.get("inputs", {}).get("model", {}).get("name", "?"),
                                   shard_dir, _size(shard_dir), min(stamps, default=0), shard_dir.name[:12], 0))
    return sorted(infos, key=lambda e: -e.created_at)


def disk_usage(root: Path) -> dict[str, int]:
    """Bytes used per kind."""
    return {k: _size(root / k) for k in kinds(root)}


def plan_clear(root: Path, kind: str | None = None) -> Plan:
    """Everything of one kind (or all kinds)."""
    plan = Plan()
    for folder in _kind_dirs(root, kind):
        plan.add(folder)
    return plan


def plan_prune(root: Path, older_than: float, now: float | None = None, kind: str | None = None) -> Plan:
    """Entries and shards created more than `older_than` seconds ago, plus leftovers of dead writers.

    A shard folder whose shards are all old goes whole, predictor header included.
    """
    now = time.time() if now is None else now
    old: list[Path] = []
    for folder in _kind_dirs(root, kind):
        for path in _entry_files(folder):
            doc = _peek(path)
            if doc is None:
                continue  # `verify` reports these
            created = doc.get("metadata", {}).get("created_at", doc.get("created_at"))
            if created is not None and now - created > older_than:
                old.append(path)
        old += [t for t in folder.rglob(".*.tmp") if now - t.stat().st_mtime > _TEMP_GRACE]
    plan = Plan()
    emptied = set()
    for path in old:
        folder = path.parent
        if folder.parent.name == "examples" and folder not in emptied and all(
            p in old for p in folder.glob("*.json") if p.name != "predictor.json"
        ):
            emptied.add(folder)
            plan.add(folder)
        elif folder not in emptied:
            plan.add(path)
    return plan


def verify(root: Path, kind: str | None = None) -> tuple[int, list[tuple[Path, str]]]:
    """Check every entry's checksum. Returns (entries checked, [(path, problem)])."""
    checked, problems = 0, []
    for folder in _kind_dirs(root, kind):
        for path in _entry_files(folder, bookkeeping=True):
            checked += 1
            try:
                unseal(path.read_bytes())
            except (OSError, CorruptEntryError) as exc:
                problems.append((path, str(exc)))
    return checked, problems


def _key_inputs(ref: str, root: Path) -> tuple[str, dict]:
    """Key inputs of an entry given as a path or a key prefix."""
    path = Path(ref)
    if not path.is_file():
        matches = [p for folder in _kind_dirs(root, None) for p in folder.glob(f"*_{ref[:12]}*.json")]
        if len(matches) != 1:
            raise ConfigError(f"{ref!r} names {len(matches)} entries under {root}; give a file path or a longer key.")
        path = matches[0]
    doc = _peek(path)
    if doc is None or "key" not in doc:
        raise ConfigError(f"{path} is not a readable cache entry; run `hf-cachehooks verify`.")
    return path.name, doc["key"]["inputs"]


def explain(root: Path, a: str | None = None, b: str | None = None) -> list[str]:
    """Lines saying which key fields differ between entries `a` and `b`, or why the last lookup missed."""
    if a and b:
        (name_a, inputs_a), (name_b, inputs_b) = _key_inputs(a, root), _key_inputs(b, root)
        changes = diff_inputs(inputs_a, inputs_b)
        return [f"{name_a} → {name_b}:"] + ([f"  {c}" for c in changes] or ["  same key inputs"])
    lines = []
    for folder in _kind_dirs(root, None):
        doc = _peek(folder / "last_miss.json")
        if doc is None:
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(doc["timestamp"]))
        lines.append(f"Last {doc['kind']} miss ({when}, key {doc['digest'][:12]}): {doc['reason']}")
        lines += [f"  {c}" for c in doc.get("changes", [])]
    return lines or [f"No recorded miss under {root}."]


def to_json(infos: list[EntryInfo]) -> bytes:
    """Entries as JSON lines data for `ls --format json`."""
    return orjson.dumps([{**e.__dict__, "path": str(e.path)} for e in infos], option=orjson.OPT_INDENT_2)
