"""The lm-eval request cache: each request's answer, in shards keyed by the model, saved as they are computed.

    <cache root>/lm-eval/
    ├── CACHEDIR.TAG
    ├── last_miss.json                  entry "last-miss": why the last model key had nothing cached (`explain`)
    └── <model key digest16>/
        └── <shard>.json                entry "lm-eval-results": key = the model key (model identity, tokenizer,
                                        generation defaults, settings, lm-eval version); "rows": {request hash:
                                        answer}, one shard per batch of answers as they are computed

A request's hash covers the method (`loglikelihood`, `loglikelihood_rolling`, `generate_until`) and its
`args` as lm-eval builds them (context and continuation, or the text, or the context and generation
kwargs), so the chat template, few-shot examples and stop sequences are in it. Every file is an entry
of the one contract (`entry.py`): a killed run keeps every shard it sealed, and the next run computes
only the rest.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from .._core.entry import commit, open_entry, remove_entry
from .._core.heads import read_head
from .._core.keys import Key, diff_inputs, dumps, hash_bytes
from .._core.kinds import MISS_KIND
from .._core.store import tag_folder
from ..errors import ConfigError

log = logging.getLogger(__name__)

KIND = "lm-eval-results"
METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def request_hash(method: str, args: Any) -> str | None:
    """The hash of one lm-eval request (`Instance.args`) for `method`; None when its args are not plain data
    (such a request is computed every time, never cached).

    Example:
        >>> request_hash("loglikelihood", ("Q: sky?", " blue")) == request_hash("loglikelihood", ["Q: sky?", " blue"])
        True
    """
    try:
        return hash_bytes(dumps([method, list(args)]))
    except ConfigError:
        return None


def is_answer(method: str, value: Any) -> bool:
    """True when `value` (parsed from a shard) has the shape `method` returns."""
    if method == "loglikelihood":
        return (
            isinstance(value, list)
            and len(value) == 2
            and isinstance(value[0], (int, float))
            and not isinstance(value[0], bool)
            and isinstance(value[1], bool)
        )
    if method == "loglikelihood_rolling":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def as_answer(method: str, value: Any) -> Any:
    """A stored answer as lm-eval's model returns it: `(logprob, is_greedy)` for loglikelihood."""
    if method == "loglikelihood":
        return (float(value[0]), bool(value[1]))
    return float(value) if method == "loglikelihood_rolling" else value


def _changed(old: Any, new: Any) -> int:
    """How many leaves differ between two key inputs (to rank entries; `diff_inputs` names them)."""
    if old == new:
        return 0
    if isinstance(old, dict) and isinstance(new, dict):
        return sum(_changed(old.get(k), new.get(k)) for k in old.keys() | new.keys())
    return 1


class RequestStore:
    """Answers of lm-eval requests under one cache root, by model key.

    Args:
        root: the cache root; the store lives in `<root>/lm-eval/`.
        model: the model's name as the user gave it: shown by `hf-cachehooks ls`, never keyed.
        max_age_days: shards older than this are misses (None: never expire).
    """

    def __init__(self, root: Path, model: str = "", max_age_days: float | None = None) -> None:
        self.folder = Path(root) / "lm-eval"
        self.model = model
        self.max_age_days = max_age_days

    def shard_folder(self, key: Key) -> Path:
        return self.folder / key.digest[:16]

    def load(self, key: Key) -> dict[str, Any]:
        """Every stored answer for this model key: {request hash: answer as stored}, oldest shard first."""
        found = []
        try:
            names = sorted(p.name for p in self.shard_folder(key).glob("*.json"))
        except OSError:
            names = []
        for name in names:
            shard = open_entry(
                self.shard_folder(key) / name, kind=KIND, digest=key.digest, max_age_days=self.max_age_days
            )
            if shard is not None and isinstance(shard.doc.get("rows"), dict):
                found.append((shard.created_at, name, shard.doc["rows"]))
        rows: dict[str, Any] = {}
        for _, _, shard_rows in sorted(found, key=lambda f: (f[0], f[1])):
            rows.update(shard_rows)
        return rows

    def save(self, key: Key, rows: dict[str, Any]) -> bool:
        """Seal one shard of answers (atomically: a crash loses at most the batch being written)."""
        if not rows:
            return True
        tag_folder(self.folder)
        name = f"b{time.time_ns()}-{os.getpid()}.json"
        return commit(
            self.shard_folder(key) / name, KIND, key, fields={"model": self.model, "requests": len(rows), "rows": rows}
        )

    def compact(self, key: Key) -> None:
        """Merge this key's shards into one, so the next run reads one file (newer answers win)."""
        paths = sorted(self.shard_folder(key).glob("*.json"))
        if len(paths) < 2:
            return
        rows = self.load(key)
        merged = self.shard_folder(key) / f"merged-{time.time_ns()}-{os.getpid()}.json"
        if commit(merged, KIND, key, fields={"model": self.model, "requests": len(rows), "rows": rows}):
            for path in paths:
                remove_entry(path)

    def explain_miss(self, key: Key) -> str:
        """Name the key fields that differ from the closest other model key in this store, and record it
        for `hf-cachehooks explain`. Only the head of one shard per key is read."""
        best: tuple[int, str, dict] | None = None
        try:
            folders = sorted(p for p in self.folder.iterdir() if p.is_dir() and p.name != key.digest[:16])
        except OSError:
            folders = []
        for folder in folders:
            shard = next(iter(sorted(folder.glob("*.json"))), None)
            head = read_head(shard) if shard is not None else None
            if head is None or head[0] != KIND or not isinstance(head[1].get("inputs"), dict):
                continue
            count = _changed(head[1]["inputs"], key.inputs)
            if best is None or count < best[0]:
                best = (count, folder.name, head[1]["inputs"])
        changes = diff_inputs(best[2], key.inputs) if best is not None else []
        if best is None:
            reason = "no earlier lm-eval run in this cache"
        elif not changes:
            reason = f"model key {best[1]} has the same inputs but its answers are expired or unreadable"
        else:
            reason = f"closest model key {best[1]} differs in " + "; ".join(changes[:6])
        tag_folder(self.folder)
        commit(
            self.folder / "last_miss.json",
            MISS_KIND,
            key,
            fields={"reason": reason, "closest": best[1] if best else None, "changes": changes},
        )
        return reason
