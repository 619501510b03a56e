"""The activation store: hidden states on disk as Arrow shards that `datasets.load_from_disk` opens.

    DIR/
    ├── layer_info.json        {"layers", "num_examples", "hidden_size", "dtype", "positions"} (the seed's)
    ├── metadata.json          per-example info (index, label, fields) and the key inputs
    ├── manifest.json          sealed: key, chunks in dataset order with rows and checksums
    ├── state.json, dataset_info.json   so `datasets.load_from_disk(DIR)` works
    └── data-00000.arrow …     one Arrow IPC stream per chunk of examples, with data-00000.json beside it

Columns: `example_index`, the dataset's scalar fields, `position`/`token_id` (positions="all"), and one
`layer_{L}` column per layer as FixedSizeList<float16|float32>[hidden]. Arrow has no bfloat16: bf16 is
stored as its uint16 bits with a dtype tag and read back bit-exact. Reading memory-maps the shards
(zero-copy) and gathers rows with numpy, never a Python loop over rows; a subset is an index view.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .errors import ConfigError, CorruptEntryError
from .keys import diff_inputs
from .store import read_entry, unseal, write_entry

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
_ARROW_TYPE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}  # bf16 travels as its bits


def chunk_name(chunk: int) -> str:
    return f"data-{chunk:05d}"


class ActivationStore:
    """A finished activation cache, opened read-only.

    Args:
        folder: the cache folder written by `cache_activations`.
        indices: optional row indices: a view of those rows, in that order (nothing is copied on disk).

    Raises:
        ConfigError: the folder holds no finished cache (the message says how to make one).

    Example:
        >>> store = ActivationStore("activations_cache/smollm2_eval")
        >>> x = store.layer(20)                 # (examples, 576) torch tensor, stored dtype
        >>> sub = store.select(range(10_000))   # a view; store.layer on it gathers 10k rows
    """

    def __init__(self, folder: str | Path, indices: Sequence[int] | np.ndarray | None = None) -> None:
        self.folder = Path(folder)
        manifest = read_entry(self.folder / "manifest.json")
        if manifest is None or not manifest.get("complete"):
            raise ConfigError(f"{self.folder} holds no finished activation cache. Create it with "
                              "`hf-cachehooks cache-activations --output DIR ...` (an interrupted run resumes).")
        self.manifest = manifest
        self.layers: list[int] = manifest["layers"]
        self.hidden_size: int = manifest["hidden_size"]
        self.dtype: str = manifest["dtype"]
        self.positions: str = manifest["positions"]
        self.model: dict = manifest["key"]["inputs"]["model"]
        self._tables: list | None = None
        counts = [c["rows"] for c in manifest["chunks"]]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices is not None and len(self.indices) and (
                self.indices.min() < 0 or self.indices.max() >= self._offsets[-1]):
            raise ConfigError(f"Row indices must lie in 0..{self._offsets[-1] - 1} for this cache.")

    def __len__(self) -> int:
        return int(self._offsets[-1]) if self.indices is None else len(self.indices)

    @property
    def key_inputs(self) -> dict:
        return self.manifest["key"]["inputs"]

    def select(self, indices: Sequence[int] | np.ndarray) -> ActivationStore:
        """A view of some rows (relative to this view), e.g. the first 10k of 50k or a stratified sample."""
        chosen = np.asarray(indices, dtype=np.int64)
        view = ActivationStore(self.folder, chosen if self.indices is None else self.indices[chosen])
        view._tables = self._tables  # share the shards already mapped (None if not opened yet)
        return view

    def tables(self) -> list:
        """The shards as memory-mapped Arrow tables, in dataset order (opened once)."""
        if self._tables is None:
            import pyarrow as pa

            self._tables = [pa.ipc.open_stream(pa.memory_map(str(self.folder / c["file"]))).read_all()
                            for c in self.manifest["chunks"]]
        return self._tables

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            cached = ", ".join(map(str, self.layers))
            raise ConfigError(f"Layer {layer} is not in this cache (cached: {cached}). Re-run cache-activations "
                              f"with --layers including {layer}.")

    def numpy(self, layer: int) -> np.ndarray:
        """Layer `layer` as a (rows, hidden) numpy array of the stored type (uint16 bits for bf16)."""
        self._check_layer(layer)
        parts = [_matrix(t.column(f"layer_{layer}"), self.hidden_size) for t in self.tables()]
        if self.indices is None:
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        chunk = np.searchsorted(self._offsets, self.indices, side="right") - 1
        out = np.empty((len(self.indices), self.hidden_size), dtype=parts[0].dtype)
        for c in np.unique(chunk):
            mask = chunk == c
            out[mask] = parts[c][self.indices[mask] - self._offsets[c]]
        return out

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
        if name not in tables[0].column_names:
            fields = [c for c in tables[0].column_names if not c.startswith("layer_")]
            raise ConfigError(f"No column {name!r} in this cache (columns: {', '.join(fields)}).")
        values = [v for t in tables for v in t.column(name).to_pylist()]
        return values if self.indices is None else [values[i] for i in self.indices]

    def info(self) -> dict:
        """What `hf-cachehooks info` prints."""
        size = sum((self.folder / c["file"]).stat().st_size for c in self.manifest["chunks"])
        return {"folder": str(self.folder), "layers": self.layers, "num_examples": self.manifest["num_examples"],
                "rows": len(self), "hidden_size": self.hidden_size, "dtype": self.dtype, "positions": self.positions,
                "bytes": size, "chunks": len(self.manifest["chunks"]), "model": self.model.get("name"),
                "key": self.manifest["key"]["digest"][:12], "created": self.manifest.get("timestamp")}

    def to_dataset(self) -> Any:
        """The same folder through `datasets.load_from_disk` (bf16 columns hold uint16 bits there)."""
        from datasets import load_from_disk

        return load_from_disk(str(self.folder))


def verify_store(folder: str | Path) -> list[str]:
    """Problems found in an activation cache: unreadable manifest, missing or altered shards."""
    from .fingerprint import hash_file

    folder = Path(folder)
    try:
        manifest = unseal((folder / "manifest.json").read_bytes())  # report, never delete
    except (OSError, CorruptEntryError) as exc:
        return [f"{folder / 'manifest.json'}: {exc}"]
    problems = []
    for chunk in manifest["chunks"]:
        path = folder / chunk["file"]
        if not path.exists():
            problems.append(f"{path}: missing")
        elif hash_file(path) != chunk["content_hash"]:
            problems.append(f"{path}: content does not match the manifest")
    return problems


def _matrix(column: Any, hidden: int) -> np.ndarray:
    """A FixedSizeList column as a (rows, hidden) numpy array: zero-copy for a single-chunk column."""
    arrays = [chunk.flatten().to_numpy(zero_copy_only=True) for chunk in column.chunks]
    flat = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    return flat.reshape(-1, hidden)


def explain_mismatch(folder: Path, inputs: dict) -> list[str] | None:
    """Key fields that differ from the cache already in `folder` (None when there is none)."""
    for name in ("manifest.json", f"{chunk_name(0)}.json"):
        doc = read_entry(folder / name)
        if doc is not None:
            return diff_inputs(doc["key"]["inputs"], inputs)
    return None


def write_layer_info(folder: Path, manifest: dict) -> None:
    """The seed's two human-readable files, plus what `datasets.load_from_disk` needs."""
    info = {k: manifest[k] for k in ("layers", "num_examples", "hidden_size", "dtype", "positions")}
    info["model"] = manifest["key"]["inputs"]["model"].get("name")
    write_entry(folder / "layer_info.json", info)
    state = {"_data_files": [{"filename": c["file"]} for c in manifest["chunks"]],
             "_fingerprint": manifest["key"]["digest"][:16], "_format_columns": None, "_format_kwargs": {},
             "_format_type": None, "_output_all_columns": False, "_split": None}
    (folder / "state.json").write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2))
    (folder / "dataset_info.json").write_bytes(orjson.dumps(
        {"description": f"hf_cachehooks activations ({manifest['dtype']}; bf16 columns hold uint16 bits)",
         "features": manifest["features"]}, option=orjson.OPT_INDENT_2))
