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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._core.entry import commit, inspect, open_entry, remove_entry
from .._core.freshness import is_expired
from .._core.keys import Key, diff_inputs
from .._core.remote import sync_folder
from .._core.rows import short_name
from .._core.store import tag_folder

log = logging.getLogger(__name__)


class PredictionCache:
    """Run entries and per-example shards in one folder.

    Args:
        folder: the predictions folder (created on first write).
        clock: time source for expiry.
        max_age_days: entries older than this are misses (None: never expire).
    """

    def __init__(self, folder: Path, clock: Callable[[], float], max_age_days: float | None) -> None:
        self.folder = Path(folder)
        self.clock = clock
        self.max_age_days = max_age_days

    def run_path(self, key: Key, model_name: str) -> Path:
        return self.folder / f"{short_name(model_name)}_{key.short}.json"

    def load_run(self, key: Key, model_name: str) -> dict | None:
        """The run entry for `key`, or None when absent, corrupt, for another key, or expired."""
        found = open_entry(self.run_path(key, model_name), kind="predictions", digest=key.digest,
                           max_age_days=self.max_age_days, now=self.clock())
        if found is None:
            return None
        doc = found.doc
        if not (isinstance(doc.get("predictions"), list) and isinstance(doc.get("references"), list)
                and isinstance(doc.get("metrics"), dict) and isinstance(doc.get("metadata"), dict)
                and len(doc["predictions"]) == len(doc["references"])):
            log.warning("Cache entry %s has fields of the wrong shape; removing it and recomputing.", found.path)
            remove_entry(found.path)
            return None
        return doc

    def save_run(self, key: Key, model_name: str, doc: dict[str, Any]) -> Path | None:
        tag_folder(self.folder)
        path = self.run_path(key, model_name)
        fields = {k: v for k, v in doc.items() if k != "key"}
        created = doc.get("metadata", {}).get("created_at")
        return path if commit(path, "predictions", key, fields=fields, created_at=created) else None

    def explain_miss(self, key: Key) -> str:
        """Name the fields that differ from the closest existing entry, and record it for `explain`."""
        best: tuple[int, Path, list[str]] | None = None
        for path in sorted(self.folder.glob("*.json")):
            found, _ = inspect(path)
            if found is None or found.kind != "predictions" or found.key.get("kind") != key.kind:
                continue
            changes = diff_inputs(found.key["inputs"], key.inputs)
            if best is None or len(changes) < best[0]:
                best = (len(changes), path, changes)
        if best is None:
            reason = "no earlier entry in this cache"
        elif not best[2]:
            reason = f"{best[1].name} has the same key but is expired or unreadable"
        else:
            reason = f"closest entry {best[1].name} differs in " + "; ".join(best[2][:6])
        commit(self.folder / "last_miss.json", "last-miss", key, fields={
            "reason": reason, "closest": best[1].name if best else None, "changes": best[2] if best else [],
            "timestamp": self.clock()}, created_at=self.clock())
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
        return commit(self.examples_dir(predictor) / f"{name}.json", "example-predictions", predictor,
                      fields={"rows": rows}, created_at=self.clock())

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
