"""The prediction cache: one human-readable JSON per run plus per-example shards for reuse.

    predictions/
    ├── CACHEDIR.TAG
    ├── SmolLM2-135M-Instruct_a1b2c3d4e5f6.json   entry "predictions": metadata, predictions, references,
    │                                             metrics and the key, in one sealed manifest (no data files)
    ├── last_miss.json                            entry "last-miss": why the last lookup missed (`explain`)
    └── examples/<predictor hash16>/
        └── <shard>.json                          entry "example-predictions": {example hash: prediction},
                                                  one per batch, keyed by the predictor (model, prompt, gen)

Every file is an entry of the one contract (`entry.py`). The run file answers a repeated run in one
read. The shards are keyed by (everything but the data) and the hash of each example's model input,
so a crashed run resumes, a subset or superset reuses what exists, and a changed reference or metric
never re-predicts.
"""

from __future__ import annotations

import logging
import os
from itertools import chain
from pathlib import Path
from typing import Any

import orjson

from .._core.cache_config import CacheConfig, settle
from .._core.entry import commit, open_entry, remove_entry
from .._core.freshness import is_expired
from .._core.heads import read_head
from .._core.keys import Key, diff_inputs
from .._core.remote import sync_folder
from .._core.rows import short_name
from .._core.store import tag_folder

log = logging.getLogger(__name__)
_ABSENT = object()


_ATOMS = frozenset({str, int, float, bool, type(None)})


def _copied(value: Any) -> Any:
    """A copy of parsed JSON `value` sharing only its immutable leaves, at C speed for the usual shapes
    (a list of strings or numbers, a list of such lists, a small dict of those)."""
    if type(value) is dict:
        return {name: item if type(item) in _ATOMS else _copied(item) for name, item in value.items()}
    if type(value) is not list:
        return value
    kinds = set(map(type, value))
    if kinds <= _ATOMS:
        return list(value)
    if kinds == {list} and set(map(type, chain.from_iterable(value))) <= _ATOMS:
        return list(map(list, value))
    return orjson.loads(orjson.dumps(value))  # any other nesting: parsed again from compact bytes


def _changed(old: Any, new: Any) -> int:
    """How many leaves differ between two key inputs (to rank entries; `diff_inputs` names them)."""
    if old == new:
        return 0
    if type(old) is dict and type(new) is dict and old and new:
        return sum(_changed(old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in old.keys() | new.keys())
    return 1


class PredictionCache:
    """Run entries and per-example shards in one folder.

    Args:
        cache: where and how long: the folder is `cache.folder_for("predictions")` (created on first write),
            entries older than `cache.max_age` are misses (left out: the predictions' own 30 days), and
            `cache.clock` is the time source.

    Raises:
        ConfigError: `cache` is not a `CacheConfig`.

    Example:
        >>> cache = PredictionCache(CacheConfig(root="outputs/cache", max_age=timedelta(days=7)))
        >>> cache.folder.as_posix(), cache.max_age_days
        ('outputs/cache/predictions', 7.0)
    """

    def __init__(self, cache: CacheConfig) -> None:
        self.cache = settle(cache, {}, {}, "EvalConfig")  # a max_age left out: the predictions' own default
        self.folder = self.cache.folder_for("predictions")
        self.clock = self.cache.clock
        self.max_age_days = self.cache.max_age_days

    def run_path(self, key: Key, model_name: str) -> Path:
        return self.folder / f"{short_name(model_name)}_{key.short}.json"

    def _run_of(self, key: Key, model_name: str) -> Path:
        """The run file of `key`: under this model's name, else under another name the same weights had (the
        name is shown, not keyed: a model evaluated as an object, then by the folder it was saved to)."""
        path = self.run_path(key, model_name)
        if path.exists():
            return path
        tail = f"_{key.short}.json"
        try:
            with os.scandir(self.folder) as found:
                other = sorted(e.name for e in found if e.name.endswith(tail) and e.is_file(follow_symlinks=False))
        except OSError:
            other = []
        return self.folder / other[0] if other else path

    def load_run(self, key: Key, model_name: str, references: bool = True) -> dict | None:
        """The run entry for `key`, or None when absent, corrupt, for another key, or expired.

        An unchanged entry is parsed once per process (a repeated hit reads only its stamp); each call gets
        its own copy of the lists and dicts, so a caller changing its result never changes the next hit.
        `references=False` leaves them out (a caller holding the rows takes them from there: cheaper).
        """
        found = open_entry(
            self._run_of(key, model_name),
            kind="predictions",
            digest=key.digest,
            max_age_days=self.max_age_days,
            now=self.clock(),
            reuse=True,
        )
        if found is None:
            return None
        doc = found.doc
        if not (
            isinstance(doc.get("predictions"), list)
            and isinstance(doc.get("references"), list)
            and isinstance(doc.get("metrics"), dict)
            and isinstance(doc.get("metadata"), dict)
            and len(doc["predictions"]) == len(doc["references"])
        ):
            log.warning("Cache entry %s has fields of the wrong shape; removing it and recomputing.", found.path)
            remove_entry(found.path)
            return None
        skip = ("key",) if references else ("key", "references")  # the key is the caller's
        if not found.shared:  # parsed for this call: it is the caller's already
            return {name: value for name, value in doc.items() if name not in skip}
        return {name: _copied(value) for name, value in doc.items() if name not in skip}

    def save_run(self, key: Key, model_name: str, doc: dict[str, Any]) -> Path | None:
        tag_folder(self.folder)
        path = self.run_path(key, model_name)
        fields = {k: v for k, v in doc.items() if k != "key"}
        created = doc.get("metadata", {}).get("created_at")
        return path if commit(path, "predictions", key, fields=fields, created_at=created) else None

    def explain_miss(self, key: Key) -> str:
        """Name the fields that differ from the closest existing entry, and record it for `explain`.

        Only the head of each run entry is read (its kind and key), never its predictions.
        """
        best: tuple[int, Path, dict] | None = None
        try:
            with os.scandir(self.folder) as found:
                names = sorted(e.name for e in found if e.name.endswith(".json") and e.is_file(follow_symlinks=False))
        except OSError:
            names = []
        for name in names:
            head = read_head(self.folder / name)
            if head is None or head[0] != "predictions" or head[1].get("kind") != key.kind:
                continue
            inputs = head[1].get("inputs")
            if isinstance(inputs, dict):
                count = _changed(inputs, key.inputs)
                if best is None or count < best[0]:
                    best = (count, self.folder / name, inputs)
        closest, changes = (best[1], diff_inputs(best[2], key.inputs)) if best is not None else (None, [])
        if closest is None:
            reason = "no earlier entry in this cache"
        elif not changes:
            reason = f"{closest.name} has the same key but is expired or unreadable"
        else:
            reason = f"closest entry {closest.name} differs in " + "; ".join(changes[:6])
        commit(
            self.folder / "last_miss.json",
            "last-miss",
            key,
            fields={
                "reason": reason,
                "closest": closest.name if closest else None,
                "changes": changes,
                "timestamp": self.clock(),
            },
            created_at=self.clock(),
        )
        return reason

    # Per-example shards -------------------------------------------------------------------------

    def examples_dir(self, predictor: Key) -> Path:
        return self.folder / "examples" / predictor.digest[:16]

    def _shards(self, predictor: Key) -> list[tuple[Path, dict]]:
        """Readable shards of this predictor, oldest first, so newer predictions win on overlap."""
        docs = []
        sync_folder(self.examples_dir(predictor), "*.json")  # a root on object storage: list its shards (else no-op)
        for shard in self.examples_dir(predictor).glob("*.json"):
            found = open_entry(shard, kind="example-predictions", digest=predictor.digest)
            if found is not None and isinstance(found.doc.get("rows"), dict):
                docs.append((shard, found.doc))
        return sorted(docs, key=lambda d: (d[1]["created_at"], d[0].name))

    def load_examples(self, predictor: Key) -> dict[str, Any]:
        """All fresh per-example predictions for this predictor: {example hash: prediction}."""
        rows: dict[str, Any] = {}
        now = self.clock()
        for _, doc in self._shards(predictor):
            if not is_expired(doc["created_at"], now, self.max_age_days):
                rows.update(doc["rows"])
        return rows

    def save_examples(self, predictor: Key, rows: dict[str, Any], name: str) -> bool:
        """Write one shard of finished examples (atomically: a crash loses at most this batch)."""
        tag_folder(self.folder)
        return commit(
            self.examples_dir(predictor) / f"{name}.json",
            "example-predictions",
            predictor,
            fields={"rows": rows},
            created_at=self.clock(),
        )

    def compact(self, predictor: Key) -> None:
        """Merge a finished run's many small shards into one, so the next resume reads one file."""
        shards = self._shards(predictor)
        if len(shards) < 2:
            return
        rows: dict[str, Any] = {}
        for _, doc in shards:
            rows.update(doc["rows"])
        oldest = shards[0][1]["created_at"]  # conservative: the merge expires with its oldest row
        merged = self.examples_dir(predictor) / f"merged-{len(rows)}-{int(oldest)}.json"
        if commit(merged, "example-predictions", predictor, fields={"rows": rows}, created_at=oldest):
            for path, _ in shards:
                if path != merged:
                    remove_entry(path)
