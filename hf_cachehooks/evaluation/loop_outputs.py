"""The outputs of one `Trainer.evaluation_loop` on disk: every array in one safetensors file, its layout and the
metrics in the manifest (an entry of the one contract, `entry.py`).

    <root>/trainer-eval/
    ├── CACHEDIR.TAG
    ├── <digest24>.json          entry "trainer-eval": key, model, num_samples, the layout of predictions,
    │                            label_ids, inputs and losses (nested lists/tuples/dicts of array names),
    │                            the loss, and the metrics with the `compute_metrics` they came from
    ├── <digest24>.safetensors   every array of those outputs (a0, a1, ...), bytes as the loop returned them
    └── last_miss.json           entry "last-miss": why the last lookup missed (`hf-cachehooks explain`)

Arrays keep their dtype, shape and bytes, so a hit returns what the loop returned, bit for bit. An output that
holds anything but numpy arrays (in lists, tuples and dicts with string keys) is not stored: the loop then
runs every time.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .._core.cache_config import CacheConfig
from .._core.entry import commit, open_entry, remove_entry, write_file
from .._core.heads import read_head
from .._core.keys import Key, diff_inputs
from .._core.store import tag_folder

log = logging.getLogger(__name__)

KIND = "trainer-eval"
OUTPUTS = ("predictions", "label_ids", "inputs", "losses")  # what the loop returns, and what compute_metrics got


class _NotStorable(ValueError):
    """An output the safetensors file cannot hold exactly (a str array, a Python object, ...)."""


@dataclass
class LoopRecord:
    """What one loop run left: its arrays (`OUTPUTS`), sample count, loss, and the metrics it computed.

    `metrics_called`: the loop called `compute_metrics` (predictions and labels were there); `metrics` its
    result (denumpified, JSON-exact) or None when not storable; `metrics_by` the description of the
    `compute_metrics` that made it (None: unknowable, so recomputed on every hit).
    """

    outputs: dict[str, Any]
    num_samples: int
    loss: float | None
    metrics_called: bool
    metrics: dict | None = None
    metrics_by: Any = None
    model: str = "-"
    path: Path | None = field(default=None, compare=False)


def layout(value: Any, arrays: dict[str, Any]) -> Any:
    """`value`'s nesting as JSON with each array replaced by its name in `arrays` (filled here).

    Raises:
        _NotStorable: something other than None, numpy arrays of a plain dtype, lists, tuples and str-keyed dicts.
    """
    import numpy as np

    if value is None:
        return None
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf" or value.dtype.byteorder == ">":
            raise _NotStorable(f"an array of dtype {value.dtype} cannot be stored as safetensors")
        name = f"a{len(arrays)}"
        arrays[name] = value
        return {"array": name}
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [layout(item, arrays) for item in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: layout(v, arrays) for k, v in value.items()}}
    raise _NotStorable(f"a {type(value).__name__} is not an array, list, tuple or dict of them")


def rebuild(spec: Any, arrays: dict[str, Any]) -> Any:
    """The value `layout` described, from the arrays read back (KeyError/TypeError: a malformed layout)."""
    if spec is None:
        return None
    if "array" in spec:
        return arrays[spec["array"]]
    if "list" in spec:
        return [rebuild(item, arrays) for item in spec["list"]]
    if "tuple" in spec:
        return tuple(rebuild(item, arrays) for item in spec["tuple"])
    return {k: rebuild(v, arrays) for k, v in spec["dict"].items()}


def json_exact(value: Any) -> bool:
    """True when `value` comes back from JSON equal and of the same types (no tuples, NaN or numpy left)."""
    try:
        back = orjson.loads(orjson.dumps(value))
    except TypeError:
        return False
    return _same(value, back)


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


class LoopStore:
    """Loop outputs of one cache root (`cache.folder_for("trainer-eval")`), with `cache`'s expiry and clock."""

    def __init__(self, cache: CacheConfig) -> None:
        self.cache = cache
        self.folder = cache.folder_for(KIND)

    def manifest(self, key: Key) -> Path:
        return self.folder / f"{key.digest[:24]}.json"

    def load(self, key: Key) -> LoopRecord | None:
        """The record for `key`, or None: absent, expired, of another key, or corrupt (warned and removed)."""
        path = self.manifest(key)
        found = open_entry(
            path, kind=KIND, digest=key.digest, max_age_days=self.cache.max_age_days, now=self.cache.clock()
        )
        if found is None:
            return None
        doc = found.doc
        try:
            arrays = _read_arrays(found.folder, doc["files"])
            outputs = {name: rebuild(doc["layout"][name], arrays) for name in OUTPUTS}
            loss = doc["loss"]
            record = LoopRecord(
                outputs,
                int(doc["num_samples"]),
                None if loss is None else float(loss),
                bool(doc["metrics_called"]),
                doc["metrics"] if isinstance(doc.get("metrics"), dict) else None,
                doc.get("metrics_by"),
                str(doc.get("model", "-")),
                path,
            )
        except (KeyError, TypeError, ValueError, AttributeError, OSError) as exc:
            log.warning("Cache entry %s is unreadable (%s); removing it and recomputing.", path, exc)
            remove_entry(path)
            return None
        return record

    def save(self, key: Key, record: LoopRecord, created_at: float | None = None) -> Path | None:
        """Write the arrays, then the manifest; None (with a log line) when not storable or not writable."""
        arrays: dict[str, Any] = {}
        try:
            shapes = {name: layout(record.outputs.get(name), arrays) for name in OUTPUTS}
        except _NotStorable as exc:
            log.info("Not caching this evaluation loop: %s.", exc)
            return None
        path = self.manifest(key)
        try:
            tag_folder(self.folder)
            files = {}
            if arrays:
                import numpy as np
                from safetensors.numpy import save

                data = save({name: np.ascontiguousarray(a) for name, a in arrays.items()})
                files[path.with_suffix(".safetensors").name] = write_file(self.folder, path.stem + ".safetensors", data)
        except OSError as exc:
            log.warning("Could not cache the evaluation loop in %s (%s); it is not cached.", self.folder, exc)
            return None
        fields = {
            "model": record.model,
            "num_samples": record.num_samples,
            "layout": shapes,
            "loss": None if record.loss is None else repr(record.loss),  # repr: NaN and ±inf survive, exactly
            "metrics_called": record.metrics_called,
            "metrics": record.metrics,
            "metrics_by": record.metrics_by,
        }
        created = self.cache.clock() if created_at is None else created_at
        return path if commit(path, KIND, key, files=files, fields=fields, created_at=created) else None

    def update_metrics(self, key: Key, metrics: dict | None, metrics_by: Any) -> None:
        """Rewrite the manifest of `key` with new metrics (same files, same age): `compute_metrics` changed."""
        path = self.manifest(key)
        found = open_entry(path, kind=KIND, digest=key.digest, check="size")
        if found is None:
            return
        fields = {**found.doc, "metrics": metrics, "metrics_by": metrics_by}
        commit(path, KIND, key, files=found.files, fields=fields, created_at=found.created_at)

    def explain_miss(self, key: Key) -> str:
        """Name the key fields that differ from the closest entry here, and record it for `explain`."""
        best: tuple[int, str, list[str]] | None = None
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.endswith(".json") and n != "last_miss.json")
        except OSError:
            names = []
        for name in names:
            head = read_head(self.folder / name)
            if head is None or head[0] != KIND or not isinstance(head[1].get("inputs"), dict):
                continue
            changes = diff_inputs(head[1]["inputs"], key.inputs)
            if best is None or len(changes) < best[0]:
                best = (len(changes), name, changes)
        if best is None:
            reason = "no earlier entry in this cache"
        elif not best[2]:
            reason = f"{best[1]} has the same key but is expired or unreadable"
        else:
            reason = f"closest entry {best[1]} differs in " + "; ".join(best[2][:6])
        try:
            tag_folder(self.folder)
            fields = {"reason": reason, "closest": best[1] if best else None, "changes": best[2] if best else []}
            commit(self.folder / "last_miss.json", "last-miss", key, fields=fields, created_at=self.cache.clock())
        except OSError:
            pass
        return reason


def _read_arrays(folder: Path, files: dict) -> dict[str, Any]:
    """Every array of the entry's safetensors file (none when it lists no file), as writable arrays.

    Raises:
        ValueError: the file does not parse as safetensors (its hash matched: a writer's bug, not a flipped byte).
    """
    names = [name for name in files if name.endswith(".safetensors")]
    if not names:
        return {}
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return load((folder / names[0]).read_bytes())
    except SafetensorError as exc:
        raise ValueError(str(exc)) from None
