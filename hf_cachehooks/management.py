"""Look after a cache folder: list, size, prune by age, clear, verify checksums, explain misses.

Deleting is two steps, as in huggingface_hub: build a `Plan` (what would go, how many bytes), then
`execute()` it; `--dry-run` prints the plan only.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from .errors import ConfigError, CorruptEntryError
from .keys import diff_inputs, hash_bytes
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
    """The cache folders present under `root` (predictions, experiments, identity, ...)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def _walk(folder: Path, bookkeeping: bool = False) -> Iterator[Path]:
    """Sealed JSON files under `folder`, skipping locks and per-example shard folders (listed apart)."""
    skip = _UNSEALED if bookkeeping else _NOT_ENTRIES
    for top, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != ".locks" and (bookkeeping or d != "examples"))
        for name in sorted(files):
            if name.endswith(".json") and name not in skip:
                yield Path(top) / name


def _peek(path: Path) -> dict | None:
    """Read a sealed file for display; unlike the caches, management never deletes what it cannot read."""
    try:
        return unseal(path.read_bytes())
    except (OSError, CorruptEntryError):
        return None


def _companions(path: Path, doc: dict) -> list[Path]:
    """Files an entry lists beside its metadata (the generation cache's JSONL files)."""
    return [path.parent / name for name in doc.get("files", {})]


def _describe(folder: Path, path: Path, doc: dict) -> EntryInfo:
    meta = doc.get("metadata", {})
    model = meta.get("model_name") or doc.get("model", "?")
    if isinstance(model, dict):  # an identity memo
        model = model.get("name", "?")
    created = meta.get("created_at") or doc.get("created_at") or path.stat().st_mtime
    size = _size(path) + sum(_size(p) for p in _companions(path, doc))
    kind = doc.get("key", {}).get("kind", folder.name)
    return EntryInfo(kind, str(model), path, size, created, doc.get("key", {}).get("digest", "")[:12],
                     meta.get("dataset_size") or doc.get("num_samples") or 0)


def _entries(root: Path, kind: str | None) -> Iterator[tuple[EntryInfo, dict]]:
    for folder in (root / k for k in kinds(root)):
        for path in _walk(folder):
            doc = _peek(path)
            if doc is None:
                continue  # `verify` reports it
            info = _describe(folder, path, doc)
            if kind in (None, info.kind, folder.name):
                yield info, doc
        for shard_dir in sorted((folder / "examples").glob("*")) if (folder / "examples").is_dir() else []:
            head = _peek(shard_dir / "predictor.json") or {}
            stamps = [p.stat().st_mtime for p in shard_dir.glob("*.json")]
            info = EntryInfo(f"{folder.name}/examples", head.get("inputs", {}).get("model", {}).get("name", "?"),
                             shard_dir, _size(shard_dir), min(stamps, default=0), shard_dir.name[:12], 0)
            if kind in (None, info.kind, folder.name):
                yield info, head


def _check_kind(root: Path, kind: str | None) -> None:
    if kind is None or kind in kinds(root):
        return
    known = sorted(set(kinds(root)) | {info.kind for info, _ in _entries(root, None)})
    if kind not in known:
        raise ConfigError(f"No cache kind {kind!r} under {root} (present: {', '.join(known) or 'none'}).")


def list_entries(root: Path, kind: str | None = None) -> list[EntryInfo]:
    """Every entry (matching a kind or folder name, if given) and per-example shard folder, newest first."""
    _check_kind(root, kind)
    return sorted((info for info, _ in _entries(root, kind)), key=lambda e: -e.created_at)


def disk_usage(root: Path) -> dict[str, int]:
    """Bytes used per cache folder."""
    return {k: _size(root / k) for k in kinds(root)}


def plan_clear(root: Path, kind: str | None = None) -> Plan:
    """Everything (of one folder, or of one entry kind such as `generations`)."""
    _check_kind(root, kind)
    plan = Plan()
    if kind is None or kind in kinds(root):
        for name in kinds(root):
            if kind in (None, name):
                plan.add(root / name)
        return plan
    for info, doc in _entries(root, kind):
        for path in [info.path, *_companions(info.path, doc)]:
            plan.add(path)
    return plan


def plan_prune(root: Path, older_than: float, now: float | None = None, kind: str | None = None) -> Plan:
    """Entries and shards created more than `older_than` seconds ago, plus leftovers of dead writers.

    An entry goes with its companion files; a shard folder whose shards are all old goes whole.
    """
    _check_kind(root, kind)
    now = time.time() if now is None else now
    plan = Plan()
    for info, doc in _entries(root, kind):
        if info.kind.endswith("/examples"):
            shards = [(p, _peek(p)) for p in info.path.glob("*.json") if p.name != "predictor.json"]
            old = [p for p, d in shards if d is not None and now - d.get("created_at", now) > older_than]
            for path in [info.path] if old and len(old) == len(shards) else old:
                plan.add(path)
        elif "key" in doc and now - info.created_at > older_than:
            for path in [info.path, *_companions(info.path, doc)]:
                plan.add(path)
    for name in kinds(root):
        for temp in (root / name).rglob(".*.tmp"):
            if now - temp.stat().st_mtime > _TEMP_GRACE:
                plan.add(temp)
    return plan


def verify(root: Path, kind: str | None = None) -> tuple[int, list[tuple[Path, str]]]:
    """Check every sealed file's checksum and its companions'. Returns (files checked, [(path, problem)])."""
    _check_kind(root, kind)
    checked, problems = 0, []
    for name in kinds(root):
        whole_folder = kind in (None, name)
        for path in _walk(root / name, bookkeeping=True):
            try:
                doc = unseal(path.read_bytes())
            except (OSError, CorruptEntryError) as exc:
                if whole_folder:  # an unreadable file has no kind; report it with its folder
                    checked += 1
                    problems.append((path, str(exc)))
                continue
            if not whole_folder and doc.get("key", {}).get("kind") != kind:
                continue
            checked += 1
            for companion, digest in doc.get("files", {}).items():
                try:
                    ok = hash_bytes((path.parent / companion).read_bytes()) == digest
                except OSError:
                    ok = False
                if not ok:
                    problems.append((path.parent / companion, f"missing or does not match {path.name}"))
    return checked, problems


def _key_inputs(ref: str, root: Path) -> tuple[str, dict]:
    """Key inputs of an entry given as a path or a key prefix."""
    path = Path(ref)
    if not path.is_file():
        matches = [info.path for info, _ in _entries(root, None) if info.key and info.key.startswith(ref[:12])]
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
    for folder in (root / k for k in kinds(root)):
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
