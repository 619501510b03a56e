"""The prediction cache: one human-readable JSON per run plus per-example shards for reuse.

    predictions/
    ├── SmolLM2-135M-Instruct_a1b2c3d4e5f6.json   metadata, predictions, references, metrics, key
    ├── last_miss.json                            why the last lookup missed (for `explain`)
    └── examples/<predictor hash16>/
        ├── predictor.json                        key inputs shared by the rows (model, prompt, gen)
        └── <shard>.json                          {example hash: prediction}, one per batch

The run file answers a repeated run in one read. The shards are keyed by (everything but the data)
and the hash of each example's model input, so a crashed run resumes, a subset or superset reuses
what exists, and a changed reference or metric never re-predicts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .freshness import describe_age, is_expired
from .keys import Key, diff_inputs
from .store import read_entry, tag_folder, write_entry

log = logging.getLogger(__name__)


def short_name(model_name: str) -> str:
    """A file-name-safe model name: `Qwen/Qwen2.5-3B-Instruct` -> `Qwen2_5-3B-Instruct`."""
    base = model_name.rstrip("/").split("/")[-1] or "model"
    return re.sub(r"[^A-Za-z0-9_-]", "_", base)


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
        path = self.run_path(key, model_name)
        doc = read_entry(path)
        if doc is None:
            return None
        if doc.get("key", {}).get("digest") != key.digest:
            log.warning("Cache entry %s belongs to another key (12-digit name clash); ignoring it.", path)
            return None
        created = doc.get("metadata", {}).get("created_at", 0)
        if is_expired(created, self.clock(), self.max_age_days):
            log.info("Cache entry %s is %s old (max %s days): expired.", path.name,
                     describe_age(self.clock() - created), self.max_age_days)
            return None
        return doc

    def save_run(self, key: Key, model_name: str, doc: dict[str, Any]) -> Path | None:
        tag_folder(self.folder)
        doc = {**doc, "key": {"kind": key.kind, "digest": key.digest, "inputs": key.inputs}}
        path = self.run_path(key, model_name)
        return path if write_entry(path, doc) else None

    def explain_miss(self, key: Key) -> str:
        """Name the fields that differ from the closest existing entry, and record it for `explain`."""
        best: tuple[int, Path, list[str]] | None = None
        for path in sorted(self.folder.glob("*.json")):
            if path.name == "last_miss.json":
                continue
            doc = read_entry(path)
            if not doc or doc.get("key", {}).get("kind") != key.kind:
                continue
            changes = diff_inputs(doc["key"]["inputs"], key.inputs)
            if best is None or len(changes) < best[0]:
                best = (len(changes), path, changes)
        if best is None:
            reason = "no earlier entry in this cache"
        elif not best[2]:
            reason = f"{best[1].name} has the same key but is expired or unreadable"
        else:
            reason = f"closest entry {best[1].name} differs in " + "; ".join(best[2][:6])
        write_entry(self.folder / "last_miss.json", {
            "kind": key.kind, "digest": key.digest, "inputs": key.inputs, "reason": reason,
            "closest": best[1].name if best else None, "changes": best[2] if best else [],
            "timestamp": self.clock(),
        })
        return reason

    # Per-example shards -------------------------------------------------------------------------

    def examples_dir(self, predictor: Key) -> Path:
        return self.folder / "examples" / predictor.digest[:16]

    def _shards(self, predictor: Key) -> list[dict]:
        """Readable shards of this predictor, oldest first, so newer predictions win on overlap."""
        docs = []
        for shard in self.examples_dir(predictor).glob("*.json"):
            if shard.name == "predictor.json":
                continue
            doc = read_entry(shard)
            if doc is not None and doc.get("predictor") == predictor.digest:
                docs.append({**doc, "path": shard})
        return sorted(docs, key=lambda d: (d.get("created_at", 0), d["path"].name))

    def load_examples(self, predictor: Key) -> dict[str, Any]:
        """All fresh per-example predictions for this predictor: {example hash: prediction}."""
        rows: dict[str, Any] = {}
        now = self.clock()
        for doc in self._shards(predictor):
            if not is_expired(doc.get("created_at", 0), now, self.max_age_days):
                rows.update(doc["rows"])
        return rows

    def save_examples(self, predictor: Key, rows: dict[str, Any], name: str) -> bool:
        """Write one shard of finished examples (atomically: a crash loses at most this batch)."""
        folder = self.examples_dir(predictor)
        if not (folder / "predictor.json").exists():
            tag_folder(self.folder)
            write_entry(folder / "predictor.json", {"kind": predictor.kind, "digest": predictor.digest,
                                                     "inputs": predictor.inputs})
        doc = {"predictor": predictor.digest, "created_at": self.clock(), "rows": rows}
        return write_entry(folder / f"{name}.json", doc)

    def compact(self, predictor: Key) -> None:
        """Merge a finished run's many small shards into one, so the next resume reads one file."""
        shards = self._shards(predictor)
        if len(shards) < 2:
            return
        rows: dict[str, Any] = {}
        for doc in shards:
            rows.update(doc["rows"])
        oldest = shards[0].get("created_at", self.clock())  # conservative: the merge expires with its oldest row
        merged = self.examples_dir(predictor) / f"merged-{len(rows)}-{int(oldest)}.json"
        if write_entry(merged, {"predictor": predictor.digest, "created_at": oldest, "rows": rows}):
            for doc in shards:
                if doc["path"] != merged:
                    doc["path"].unlink(missing_ok=True)
