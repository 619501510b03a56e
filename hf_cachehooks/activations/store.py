"""The activation store: hidden states on disk as Arrow shards that `datasets.load_from_disk` opens.

    DIR/
    ├── CACHEDIR.TAG           marks the folder as this library's cache (for the management commands)
    ├── data-00000.arrow …     one Arrow IPC stream per chunk of examples, in dataset order
    ├── metadata.json          sealed: the fields, label counts and the key (the fields' values are columns)
    ├── layer_info.json        sealed: {"layers", "num_examples", "hidden_size", "dtype", "positions", "model"}
    ├── state.json, dataset_info.json   so `datasets.load_from_disk(DIR)` works
    ├── manifest.json          the entry (kind "activations"), written last: every file above with its size
    │                          and xxh3, the key, and the store's fields (layers, chunks in dataset order, …)
    └── .chunks/data-00000.json …   only while extracting: a sealed sidecar per finished chunk (resume);
                                    deleted once the manifest is written

Columns: the dataset's scalar fields (integers in the narrowest type that holds them), with
positions="all" `example_index`/`position`/`token_id` (int32; a pooled row i is example i, so it needs
none), and one `layer_{L}` column per layer as FixedSizeList<float16|float32>[hidden]. Arrow has no
bfloat16: bf16 is stored as its uint16 bits with a dtype tag and read back bit-exact. Opening checks
the manifest and every file's size, and hashes a file whose stat stamp changed since it was written
(`verify=True` hashes all); a store that fails is never read. Reading memory-maps each shard once per
store (views share the maps) and takes a layer's values at the offset the manifest records, without
an Arrow parse per shard; rows are gathered with numpy, never a Python loop over rows. Stores written
before offsets were recorded (layout 1: an int64 `example_index` column, per-example JSON) read
through Arrow as before.
"""

from __future__ import annotations

import copy
import logging
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .._core import entry, kinds, remote
from .._core.store import local_path, seal
from ..errors import ConfigError

log = logging.getLogger(__name__)

KIND = "activations"
MANIFEST = "manifest.json"
CHUNKS = ".chunks"  # per-chunk sidecars while a run extracts (entry.OWN_HIDDEN: removed with the entry)
DTYPES = kinds.ACTIVATION_DTYPES
ARROW_TYPE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}  # bf16 travels as its bits
NUMPY_TYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
LAYOUT = 2  # 2: layer offsets in the manifest, no index column for pooled rows, compact metadata.json


def _redo(folder: Path) -> str:
    """The fix for a corrupt store, in the library's words (the CLI says them as its flags)."""
    return f"Re-run cache_activations with folder={str(folder)!r} to extract it again"


def chunk_name(chunk: int) -> str:
    return f"data-{chunk:05d}"


def store_problem(found: entry.Entry) -> str | None:
    """What makes a checked-out entry unusable as an activation store (None when it is one).

    The store's own fields (chunks naming only files the manifest lists, layers, sizes) are part of the
    entry contract (`_core/kinds.py`), so `entry.inspect` has refused a malformed store already, as
    `hf-cachehooks verify`, `ls` and `prune` do; this checks the kind, and the fields again for an
    entry that reached us another way.
    """
    if found.kind != KIND:
        return f"it holds a {found.kind} entry, not activations"
    return kinds.fields_problem(found.doc)


def open_store(folder: Path, check: str = "stamp") -> entry.Entry:
    """The store's checked-out entry; never deletes anything (the caller may only be reading).

    Raises:
        ConfigError: no finished store in `folder`, or a corrupt one (names the problem and the fix).
    """
    path = folder / MANIFEST
    remote.refresh(path)  # a store on object storage: fetched whole and verified into the local copy (else no-op)
    found, problem = entry.inspect(path, check)
    if found is None and problem is None:
        raise ConfigError(
            f"{folder} holds no finished activation cache. Create it by running cache_activations with "
            f"folder={str(folder)!r} (an interrupted run resumes)."
        )
    problem = problem or store_problem(found)  # type: ignore[arg-type]
    if problem:
        raise ConfigError(f"{folder} is a corrupt activation cache ({problem}). {_redo(folder)}.")
    return found  # type: ignore[return-value]


class ActivationStore:
    """A finished activation cache, opened read-only.

    Args:
        folder: the cache folder written by `cache_activations`.
        indices: optional row indices: a view of those rows, in that order (nothing is copied on disk).
        verify: hash every file against the manifest (slow for big stores); by default sizes are
            checked and a file is hashed only when its stat stamp changed since it was written.

    Raises:
        ConfigError: the folder holds no finished cache, or a corrupt one (the message says how to make it).

    Example:
        >>> store = ActivationStore("activations_cache/smollm2_eval")
        >>> x = store.layer(20)                 # (examples, 576) torch tensor, stored dtype
        >>> sub = store.select(range(10_000))   # a view; store.layer on it gathers 10k rows
    """

    def __init__(
        self, folder: str | Path, indices: Sequence[int] | np.ndarray | None = None, *, verify: bool = False
    ) -> None:
        # By default the shards are checked as they are mapped (one fstat on the open file), so opening
        # costs what it did before the contract; `verify` hashes every file now.
        self._load(open_store(local_path(folder), "hash" if verify else "manifest"), indices)

    @classmethod
    def _of(cls, found: entry.Entry) -> ActivationStore:
        """A store from an entry the caller already opened and checked with `store_problem`."""
        store = cls.__new__(cls)
        store._load(found, None)
        return store

    def _load(self, found: entry.Entry, indices: Sequence[int] | np.ndarray | None) -> None:
        manifest = found.doc
        self.folder = found.folder
        self.manifest = manifest
        self.layers: list[int] = manifest["layers"]
        self.hidden_size: int = manifest["hidden_size"]
        self.dtype: str = manifest["dtype"]
        self.positions: str = manifest["positions"]
        self.model: dict = manifest["key"]["inputs"].get("model") or {}
        self._maps: dict[int, mmap.mmap] = {}  # chunk -> its shard, mapped once; shared with views (`select`)
        self._parsed: dict[int, Any] = {}  # chunk -> its Arrow table, parsed on demand
        counts = [c["rows"] for c in manifest["chunks"]]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.indices: np.ndarray | None = None
        if indices is not None:
            self._set_indices(np.asarray(indices, dtype=np.int64))

    def _set_indices(self, indices: np.ndarray) -> None:
        if len(indices) and (indices.min() < 0 or indices.max() >= self._offsets[-1]):
            raise ConfigError(f"Row indices must lie in 0..{self._offsets[-1] - 1} for this cache.")
        self.indices = indices

    def __len__(self) -> int:
        return int(self._offsets[-1]) if self.indices is None else len(self.indices)

    @property
    def key_inputs(self) -> dict:
        return self.manifest["key"]["inputs"]

    def select(self, indices: Sequence[int] | np.ndarray) -> ActivationStore:
        """A view of some rows (relative to this view), e.g. the first 10k of 50k or a stratified sample."""
        chosen = np.asarray(indices, dtype=np.int64)
        view = copy.copy(self)  # shares the shards already mapped (None if not opened yet)
        view._set_indices(chosen if self.indices is None else self.indices[chosen])
        return view

    def tables(self) -> list:
        """The shards as memory-mapped Arrow tables, in dataset order (mapped once, each checked first).

        Raises:
            ConfigError: a shard is missing or does not match the manifest (names it and the fix).
        """
        import pyarrow as pa

        for c in range(len(self.manifest["chunks"])):
            if c not in self._parsed:
                self._parsed[c] = pa.ipc.open_stream(pa.py_buffer(self._shard(c))).read_all()
        return [self._parsed[c] for c in range(len(self.manifest["chunks"]))]

    def _shard(self, c: int) -> mmap.mmap:
        """Chunk `c`'s shard, mapped once per store from the descriptor whose stat was checked."""
        if c not in self._maps:
            self._maps[c] = self._map(self.manifest["chunks"][c]["file"])
        return self._maps[c]

    def _map(self, name: str) -> mmap.mmap:
        """One shard, memory-mapped from the file descriptor whose stat was checked against the manifest."""
        path, record = str(self.folder / name), self.manifest["files"][name]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise ConfigError(
                f"{self.folder} is a corrupt activation cache ({name}: {exc.strerror}). {_redo(self.folder)}."
            ) from None
        try:
            if not entry.trusted(path, os.fstat(fd), record):
                problem = entry.check_file(self.folder, name, record)
                if problem:
                    raise ConfigError(f"{self.folder} is a corrupt activation cache ({problem}). {_redo(self.folder)}.")
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        return mapped

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            cached = ", ".join(map(str, self.layers))
            raise ConfigError(
                f"Layer {layer} is not in this cache (cached: {cached}). Re-run cache_activations "
                f"with layers= including {layer}."
            )

    def numpy(self, layer: int) -> np.ndarray:
        """Layer `layer` as a (rows, hidden) numpy array of the stored type (uint16 bits for bf16)."""
        self._check_layer(layer)
        parts = self._parts(layer)
        if self.indices is None:
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        chunk = np.searchsorted(self._offsets, self.indices, side="right") - 1
        out = np.empty((len(self.indices), self.hidden_size), dtype=parts[0].dtype)
        order = np.argsort(chunk, kind="stable")  # rows grouped by shard: one pass, not one mask per shard
        bounds = np.searchsorted(chunk[order], np.arange(len(parts) + 1))
        for c in np.flatnonzero(np.diff(bounds)):
            rows = order[bounds[c] : bounds[c + 1]]
            out[rows] = parts[c][self.indices[rows] - self._offsets[c]]
        return out

    def _parts(self, layer: int) -> list[np.ndarray]:
        """Each shard's (rows, hidden) values of `layer`: views into its map at the recorded offset."""
        name, chunks = f"layer_{layer}", self.manifest["chunks"]
        if not all(name in c.get("offsets", {}) for c in chunks):  # a store written before offsets: parse it
            return [_matrix(t.column(name), self.hidden_size) for t in self.tables()]
        kind, parts = NUMPY_TYPE[self.dtype], []
        for c, chunk in enumerate(chunks):
            mapped, count = self._shard(c), chunk["rows"] * self.hidden_size
            start = chunk["offsets"][name]
            if start + count * np.dtype(kind).itemsize > len(mapped):
                raise ConfigError(
                    f"{self.folder} is a corrupt activation cache ({chunk['file']}: layer {layer} "
                    f"lies past its end). {_redo(self.folder)}."
                )
            parts.append(np.frombuffer(mapped, kind, count, start).reshape(-1, self.hidden_size))
        return parts

    def layer(self, layer: int) -> Any:
        """Layer `layer` as one torch tensor (rows, hidden) in the stored dtype (bf16 bit-exact)."""
        import torch

        array = self.numpy(layer)
        if not array.flags.writeable:  # a zero-copy view of the memory map: give torch its own copy
            array = array.copy()
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if self.dtype == "bfloat16" else tensor

    def column(self, name: str) -> list:
        """A non-activation column (labels, fields, example_index, position, token_id) as a list."""
        tables = self.tables()
        if name == "example_index" and name not in tables[0].column_names:  # pooled rows: row i is example i
            values = list(range(int(self._offsets[-1])))
            return values if self.indices is None else [values[i] for i in self.indices]
        if name not in tables[0].column_names:
            fields = [c for c in tables[0].column_names if not c.startswith("layer_")]
            raise ConfigError(f"No column {name!r} in this cache (columns: {', '.join(fields)}).")
        values = [v for t in tables for v in t.column(name).to_pylist()]
        return values if self.indices is None else [values[i] for i in self.indices]

    def info(self) -> dict:
        """What `hf-cachehooks info` prints."""
        size = sum((self.folder / c["file"]).stat().st_size for c in self.manifest["chunks"])
        return {
            "folder": str(self.folder),
            "layers": self.layers,
            "num_examples": self.manifest["num_examples"],
            "rows": len(self),
            "hidden_size": self.hidden_size,
            "dtype": self.dtype,
            "positions": self.positions,
            "bytes": size,
            "chunks": len(self.manifest["chunks"]),
            "model": self.model.get("name"),
            "key": self.manifest["key"]["digest"][:12],
            "created": self.manifest.get("timestamp"),
        }

    def to_dataset(self) -> Any:
        """The same folder through `datasets.load_from_disk` (bf16 columns hold uint16 bits there).

        Every file `datasets` reads is checked against the manifest first.
        """
        from datasets import load_from_disk

        open_store(self.folder, "stamp")
        return load_from_disk(str(self.folder))


def verify_store(folder: str | Path) -> list[str]:
    """Problems found in an activation cache by hashing every file it lists (empty when healthy).

    A store on object storage (a URL) is fetched into its local copy first: a damaged remote file is reported.
    """
    folder = local_path(folder)
    remote.refresh(folder / MANIFEST)
    found, problem = entry.inspect(folder / MANIFEST, check="hash")  # report, never delete
    if found is None and problem is None:
        return [f"{folder / MANIFEST}: missing (no finished activation cache)"]
    problem = problem or store_problem(found)  # type: ignore[arg-type]
    return [f"{folder}: {problem}"] if problem else []


def _matrix(column: Any, hidden: int) -> np.ndarray:
    """A FixedSizeList column as a (rows, hidden) numpy array: zero-copy for a single-chunk column."""
    arrays = [chunk.flatten().to_numpy(zero_copy_only=True) for chunk in column.chunks]
    flat = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    return flat.reshape(-1, hidden)


def write_layer_info(folder: Path, fields: dict, key: dict) -> dict[str, dict]:
    """The layer_info.json probe scripts read, and what `datasets.load_from_disk` needs; returns their records.

    Raises:
        OSError: the folder is not writable.
    """
    info = {k: fields[k] for k in ("layers", "num_examples", "hidden_size", "dtype", "positions")}
    info["model"] = (key["inputs"].get("model") or {}).get("name")
    state = {
        "_data_files": [{"filename": c["file"]} for c in fields["chunks"]],
        "_fingerprint": key["digest"][:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    dataset_info = {
        "description": f"hf_cachehooks activations ({fields['dtype']}; bf16 columns hold uint16 bits)",
        "features": fields["features"],
    }
    return {
        "layer_info.json": entry.write_file(folder, "layer_info.json", seal(info)),
        "state.json": entry.write_file(folder, "state.json", orjson.dumps(state, option=orjson.OPT_INDENT_2)),
        "dataset_info.json": entry.write_file(
            folder, "dataset_info.json", orjson.dumps(dataset_info, option=orjson.OPT_INDENT_2)
        ),
    }
