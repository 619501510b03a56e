"""One chunk of an activation store: its Arrow table, its shard and sidecar, and the finished store.

    DIR/
    ├── data-00000.arrow …             one chunk's rows, hashed while written, fsynced, renamed into place
    └── .chunks/data-00000.json …      its sealed sidecar: rows, size, xxh3, stamp, layer offsets, key

`finish_store` turns the confirmed chunks into the store: the side files, then the manifest (written
last, listing every file and where each layer's values start in each shard), then `.chunks/` goes.
`link_store` records a finished store that lies outside the cache root in the root, so `ls`, `du`,
`verify`, `prune` and `clear` there know it:

    <root>/activations/
    ├── CACHEDIR.TAG
    └── link-<xxh3 of the store's real path>.json   an entry of kind "store-link": no files, {"folder": ...}
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from .._core import entry
from .._core.freshness import SYSTEM_CLOCK, Clock, iso
from .._core.keys import Key
from .._core.kinds import LINK_KIND
from .._core.store import atomic_target, read_entry, seal, tag_folder, url_of, write_entry
from ..errors import CacheError
from .store import ARROW_TYPE, CHUNKS, KIND, LAYOUT, MANIFEST, chunk_name, write_layer_info

log = logging.getLogger(__name__)

SHARD_BYTES = 32 << 20  # a default shard holds about this much activation data
MIN_SHARD = 1024  # examples: the smallest default shard (the fixed default of earlier versions)


def default_shard_size(num_examples: int, layers: int, hidden: int, dtype: str, positions: str, world: int) -> int:
    """Examples per chunk when `shard_size` is not given: about `SHARD_BYTES` of activations, at least 1,024.

    A chunk is the resume unit and one shard file: a large one costs fewer files, syncs and sidecars (at
    SmolLM2's width, one fp16 layer, 29,127 examples instead of 1,024), a small one loses less work when
    a run is killed. With several processes the chunks stay small enough for each rank to get about four,
    and never below 1,024. `positions="all"` keeps 1,024 examples: their row count (tokens) is only known
    once tokenized.
    """
    if positions == "all":
        return MIN_SHARD
    row_bytes = max(1, layers * hidden * (4 if dtype == "float32" else 2))
    size = max(MIN_SHARD, SHARD_BYTES // row_bytes)
    if world > 1:
        size = min(size, max(MIN_SHARD, -(-num_examples // (4 * world))))
    return size


def scalar_fields(rows: list[dict], text_field: str) -> list[str]:
    names = [k for k, v in rows[0].items() if isinstance(v, (str, int, float, bool)) and k != "example_index"]
    return [k for k in names if all(isinstance(r.get(k), type(rows[0][k])) for r in rows)]


_INTS = (("int8", 1 << 7), ("int16", 1 << 15), ("int32", 1 << 31), ("int64", 1 << 63))


def field_types(rows: list[dict], fields: Sequence[str]) -> dict[str, Any]:
    """Each scalar field's Arrow type, chosen once over all rows (see `field_columns`)."""
    return field_columns(rows, fields)[0]


def field_columns(rows: list[dict], fields: Sequence[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Each scalar field's Arrow type, chosen once over all rows, and the integer fields' values as arrays.

    Integers take the narrowest type that holds them: a 0/1 label takes 1 byte a row instead of 8. Every
    chunk (and every rank) gets the same types, so the shards share one schema and `datasets.load_from_disk`
    reads them as one table. The integer values are kept as one numpy array of that type over all rows,
    which each chunk slices: no Python per row and chunk. Other fields (string, double, bool) are left
    to Arrow's inference (type None), chunk by chunk.
    """
    import pyarrow as pa

    types: dict[str, Any] = {}
    columns: dict[str, np.ndarray] = {}
    for name in fields:
        values = list(map(itemgetter(name), rows))
        if isinstance(values[0], int) and not isinstance(values[0], bool):
            try:
                array = np.array(values, dtype=np.int64)
            except OverflowError:  # beyond int64: Arrow refuses it when the chunk is written
                types[name] = pa.int64()
                continue
            low, high = int(array.min()), int(array.max())
            kind = next(t for t, limit in _INTS if -limit <= low and high < limit)
            types[name], columns[name] = getattr(pa, kind)(), array.astype(kind)
        else:
            types[name] = None  # Arrow's own inference (string, double, bool)
    return types, columns


def arrow_table(
    pooled: list,
    start: int,
    rows: list[dict],
    fields: Sequence[str] | Mapping[str, Any],
    layers: list[int],
    dtype: str,
    hidden: int,
    columns: Mapping[str, np.ndarray] | None = None,
) -> Any:
    """One chunk's rows as an Arrow table: the dataset's scalar fields, then one column per layer.

    A pooled row is one example (row i of the store is example i), so no index column is stored; with
    positions="all" each row is a token and carries `example_index`, `position` and `token_id` as int32.
    `fields` maps names to Arrow types (see `field_columns`); a plain list lets Arrow infer them per chunk.
    `columns` holds fields' values over all rows (`field_columns`): this chunk's are sliced from them.
    """
    import pyarrow as pa
    import torch

    types = fields if isinstance(fields, Mapping) else dict.fromkeys(fields)
    # chunk-relative example of each row: one add for the chunk, not one torch op per batch (~4 µs each)
    starts = np.repeat([offset for _, offset in pooled], [p.example.shape[0] for p, _ in pooled])
    example = torch.cat([p.example for p, _ in pooled]).numpy() + starts
    whole = columns or {}
    out: dict[str, Any] = {}
    if pooled[0][0].position is not None:
        out["example_index"] = pa.array((example + start).astype(np.int32))
    in_order = len(example) and example[0] == 0 and bool(np.all(np.diff(example) == 1))
    chosen: list[dict] | None = None
    for name, kind in types.items():
        if name in whole:
            out[name] = pa.array(
                whole[name][start : start + len(example)] if in_order else whole[name][example + start]
            )
            continue
        if chosen is None:
            chosen = rows[start : start + len(example)] if in_order else [rows[start + e] for e in example.tolist()]
        out[name] = pa.array(list(map(itemgetter(name), chosen)), kind)
    if pooled[0][0].position is not None:
        out["position"] = pa.array(torch.cat([p.position for p, _ in pooled]).numpy().astype(np.int32))
        out["token_id"] = pa.array(torch.cat([p.token_id for p, _ in pooled]).numpy().astype(np.int32))
    target = getattr(torch, dtype)
    for layer in layers:
        # each batch cast on its own (small), then joined by numpy: one chunk-sized torch op would start
        # torch's thread pool, which costs seconds per 1M rows on busy cores
        parts = [p.layers[layer] if p.layers[layer].dtype == target else p.layers[layer].to(target) for p, _ in pooled]
        arrays = [(t.view(torch.uint16) if dtype == "bfloat16" else t).contiguous().numpy() for t in parts]
        flat = (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)).reshape(-1)
        out[f"layer_{layer}"] = pa.FixedSizeListArray.from_arrays(
            pa.array(flat, type=getattr(pa, ARROW_TYPE[dtype])()), hidden
        )
    return pa.table(out, metadata={"hf_cachehooks.dtype": dtype})


def sidecar(folder: Path, chunk: int) -> dict | None:
    """The sealed sidecar of a finished chunk, when it is one (a malformed one reads as absent)."""
    side = read_entry(folder / CHUNKS / f"{chunk_name(chunk)}.json") or {}
    key = side.get("key")
    if (
        not isinstance(key, dict)
        or not isinstance(key.get("digest"), str)
        or not isinstance(key.get("inputs"), dict)
        or not isinstance(side.get("bytes"), int)
        or not isinstance(side.get("content_hash"), str)
        or not isinstance(side.get("rows"), int)
    ):
        return None
    return side


def chunk_done(
    folder: Path, chunk: int, digest: str, check: str = "stamp", span: tuple[int, int] | None = None
) -> bool:
    """True when chunk `chunk` of the run keyed `digest` is finished and its shard matches its sidecar.

    `check="hash"` reads the shard: what a resumed run does, since a shard is fsynced only when the store
    is finished, so after a power cut a sidecar may outlive its shard's bytes. `span`: the examples
    (start, end) the chunk must hold; a chunk cut from another shard size is not this one.
    """
    side = sidecar(folder, chunk)
    if side is None or side["key"]["digest"] != digest or side.get("layout") != LAYOUT:
        return False  # a chunk an older version wrote (another layout) is redone, so every shard has one schema
    if span is not None and (side.get("start"), side.get("end")) != tuple(span):
        return False
    record = {"bytes": side["bytes"], "xxh3": side["content_hash"], "stamp": side.get("stamp")}
    return entry.check_file(folder, f"{chunk_name(chunk)}.arrow", record, check) is None  # the contract's check


def sidecars(folder: Path) -> Iterator[dict]:
    """The sealed sidecars of the chunks finished in `folder`, in chunk order (malformed ones left out)."""
    chunks = folder / CHUNKS
    if chunks.is_symlink() or not chunks.is_dir():
        return
    for path in sorted(chunks.iterdir()):
        if re.fullmatch(r"data-\d{5}\.json", path.name):
            side = sidecar(folder, int(path.stem[5:]))
            if side is not None:
                yield side


def resumed_shard_size(folder: Path, digest: str) -> int | None:
    """The shard size of a killed run of the run keyed `digest` in `folder`, read from any chunk it finished.

    Any chunk, not only chunk 0: with several processes, rank 0 may have died before finishing its first.
    A chunk an older version wrote counts too: its chunks are redone, but cut the same, so each new shard
    replaces an old one and none is left behind.
    """
    for side in sidecars(folder):
        size = side.get("shard_size") if side["key"]["digest"] == digest else None
        if isinstance(size, int) and size > 0:
            return size
    return None


class _HashingFile:
    """A binary file that hashes what is written to it, so a shard is never read back to be hashed."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.digest = xxhash.xxh3_128()
        self.closed = False

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.closed = True  # the handle is closed by its owner


def write_chunk(folder: Path, chunk: int, start: int, end: int, table: Any, key: Any, shard_size: int) -> None:
    """Write one chunk's shard, hashed as it is written, then its sealed sidecar; neither is fsynced here.

    `finish_store` fsyncs every shard, back to back, before the manifest is committed (whose folder fsync
    makes the renames durable): one flush for the run instead of one per chunk. Until then a power cut
    can lose or tear a shard whose sidecar survives; a resumed run hashes each finished chunk's shard
    against its sidecar (`chunk_done(check="hash")`) and redoes any that does not match. A torn sidecar
    reads as absent, a lost rename as a missing shard: both are redone.
    """
    import pyarrow as pa

    path = folder / f"{chunk_name(chunk)}.arrow"
    with atomic_target(path, durable=False) as tmp, open(tmp, "wb") as handle:
        hashing = _HashingFile(handle)
        with pa.PythonFile(hashing, mode="w") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        handle.flush()
    record = entry.file_record(path, hashing.digest.hexdigest())
    write_entry(
        folder / CHUNKS / f"{chunk_name(chunk)}.json",
        {
            "chunk": chunk,
            "start": start,
            "end": end,
            "rows": table.num_rows,
            "file": path.name,
            "bytes": record["bytes"],
            "content_hash": record["xxh3"],
            "stamp": record["stamp"],
            "shard_size": shard_size,
            "layout": LAYOUT,
            "offsets": layer_offsets(path),
            "key": {"digest": key.digest, "inputs": key.inputs},
        },
        durable=False,
    )


def layer_offsets(path: Path) -> dict[str, int]:
    """Where each `layer_{L}` column's values start in a shard just written (read from its header only).

    Recorded in the manifest, they let a read map the values straight into an array: no Arrow parse per
    shard. Parsing the stream touches its metadata pages, never the values.
    """
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        whole = source.read_buffer(source.size())
        table = pa.ipc.open_stream(whole).read_all()
        offsets = {}
        for name in table.column_names:
            if name.startswith("layer_") and table.column(name).num_chunks == 1:
                values = table.column(name).chunks[0].values
                offsets[name] = values.buffers()[1].address - whole.address + values.offset * values.type.byte_width
        return offsets


def finish_store(
    folder: Path,
    chunks: list,
    rows: list[dict],
    fields: Sequence[str] | Mapping[str, Any],
    label_field: str,
    key: Key,
    layers: list[int],
    positions: str,
    dtype: str,
    hidden: int,
    shard_size: int,
    clock: Clock = SYSTEM_CLOCK,
    columns: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Fsync every shard, write the side files, commit the manifest (last), then remove `.chunks/`.

    `columns` (from `field_columns`) holds the integer fields' values: an integer label is counted from them.

    Raises:
        CacheError: a file cannot be written (a full disk): the store is the result, so this is an error.
    """
    import pyarrow as pa
    from datasets import Features

    names = [f"{chunk_name(c)}.arrow" for c, _, _ in chunks]
    sides = [sidecar(folder, c) or {} for c, _, _ in chunks]
    schema = pa.ipc.open_stream(pa.memory_map(str(folder / names[0]))).schema
    now = clock()  # the store's created_at: the same clock its expiry is judged by
    manifest = {
        "complete": True,
        "timestamp": iso(now),
        "layers": layers,
        "num_examples": len(rows),
        "num_rows": sum(s["rows"] for s in sides),
        "hidden_size": hidden,
        "dtype": dtype,
        "positions": positions,
        "shard_size": shard_size,
        "label_field": label_field,
        "features": Features.from_arrow_schema(schema).to_dict(),
        "layout": LAYOUT,
        "chunks": [
            {
                "file": name,
                **{k: s[k] for k in ("rows", "start", "end", "bytes", "content_hash")},
                "offsets": s.get("offsets", {}),
            }
            for name, s in zip(names, sides)
        ],
    }
    key_doc = {"kind": KIND, "digest": key.digest, "inputs": key.inputs}
    files = {
        name: {"bytes": s["bytes"], "xxh3": s["content_hash"], "stamp": s.get("stamp")} for name, s in zip(names, sides)
    }
    labels = label_counts(rows, label_field, (columns or {}).get(label_field))
    try:
        _at_once(_fsync, [folder / name for name in names])  # every shard reaches the disk before the manifest
        # the per-example fields are the shards' columns (stored once); this is their summary
        files["metadata.json"] = entry.write_file(
            folder,
            "metadata.json",
            seal(
                {
                    "num_examples": len(rows),
                    "label_field": label_field,
                    "fields": list(fields),
                    "label_counts": dict(sorted(labels.items())),
                    "key": key_doc,
                }
            ),
        )
        files.update(write_layer_info(folder, manifest, key_doc))
    except OSError as exc:
        raise CacheError(
            f"Cannot write the activation store in {folder} ({exc.strerror or exc}); it stays "
            "unfinished. Free some space there, or choose another folder=."
        ) from exc
    if not entry.commit(folder / MANIFEST, KIND, key, files, manifest, created_at=now):  # last: the store exists
        raise CacheError(
            f"Cannot write the activation store's manifest in {folder} (see the warning above); "
            "the store stays unfinished. Free some space there, or choose another folder=."
        )
    _at_once(_unlink, [folder / CHUNKS / f"{chunk_name(c)}.json" for c, _, _ in chunks])  # the sidecars, then
    shutil.rmtree(folder / CHUNKS, ignore_errors=True)  # whatever else is left in .chunks
    size = sum(s["bytes"] for s in sides)
    log.info(
        "💾 Cached %d rows × %d layers (%s, %.1f MB) in %s",
        manifest["num_rows"],
        len(layers),
        dtype,
        size / 1e6,
        folder,
    )


def link_store(folder: Path, root: Path) -> Path | None:
    """Record the store in `folder` in the cache root when it lies outside it; return the link's path.

    The link is an entry of the contract listing no files: clearing it never touches the store. Nothing
    is written for a store under the root (management finds it there), on object storage, or into a
    remote root (a local path means nothing on another machine); an unwritable root is a warning.
    """
    real, top = os.path.realpath(folder), os.path.realpath(root)
    if real == top or real.startswith(os.path.join(top, "")) or url_of(folder) is not None or url_of(root) is not None:
        return None
    digest = xxhash.xxh3_64_hexdigest(real.encode())
    path = Path(root) / KIND / f"link-{digest}.json"
    if entry.is_entry_file(path):
        return path  # recorded already
    tag_folder(path.parent)
    key = {"kind": LINK_KIND, "digest": digest, "inputs": {"folder": real}}
    if not entry.replaceable(path) or not entry.commit(path, LINK_KIND, key, fields={"folder": real}):
        return None
    return path


def label_counts(rows: list[dict], label_field: str, values: np.ndarray | None = None) -> dict[str, int]:
    """How many rows carry each value of `label_field`, keyed by the value as text (rows without it skipped).

    `values`: the label over all rows, when it is an integer field (`field_columns`), counted by numpy.
    Otherwise labels of one type whose equal values print alike (str, int or bool) are counted in C, then
    named: 0.1 s for 1M rows instead of 0.3 s; anything else (floats, mixed types, a missing label) one by one.
    """
    if values is not None:
        found, counts = np.unique(values, return_counts=True)
        return {str(int(v)): int(c) for v, c in zip(found, counts)}
    try:
        labels = list(map(itemgetter(label_field), rows))
    except KeyError:
        labels = []
    kinds = set(map(type, labels))
    if labels and len(kinds) == 1 and kinds <= {str, int, bool}:
        return {str(value): count for value, count in Counter(labels).items()}
    return dict(Counter(str(r[label_field]) for r in rows if label_field in r))


def _at_once(action: Callable[[Path], None], paths: list[Path]) -> None:
    """`action` on every path from several threads: the file system joins concurrent journal commits."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(paths)))) as pool:
        list(pool.map(action, paths))  # re-raises the first error


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
