"""Filling an activation store: chunked, resumable, and shared out across processes.

    DIR/                               (the finished layout is drawn in `activations`)
    ├── data-00000.arrow …             renamed into place complete
    └── .chunks/data-00000.json …      sealed sidecar per finished chunk: size, xxh3, stamp, key

Examples are cut into chunks of `shard_size`; chunk c goes to rank c % world_size, so any number of
processes (torchrun, accelerate launch) fills the same chunks and the shards read back in dataset
order. A chunk's Arrow file is renamed into place complete and then confirmed by its sidecar; a
killed run redoes only unconfirmed chunks. Rank 0 writes the side files, then the manifest last
(`entry.commit`, listing every file), then deletes `.chunks/`. A store in the way (corrupt, expired,
or with `force` made from other inputs) is removed through its manifest: only files it lists. A
non-empty folder without our CACHEDIR.TAG is refused (see `claim_folder`), so a user's files are never replaced. A
`CacheConfig` passed as `cache` sets expiry (`max_age`), re-extraction of the same inputs
(`force_recompute`) and the clock; its root records a finished store that lies outside it (`link_store`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from .._core import entry, remote
from .._core.cache_config import CacheConfig, settle
from .._core.fingerprint import fingerprint_data
from .._core.freshness import SYSTEM_CLOCK, Clock, describe_age
from .._core.keys import Key, diff_inputs, make_key
from .._core.store import is_tagged, local_path, tag_folder, unseal
from .._models.architecture import hidden_size
from .._models.extraction import POSITIONS, batches, capture, check_layers, pool
from .._models.identity import model_identity, tokenizer_identity
from ..errors import CacheError, ConfigError, CorruptEntryError, WaitTimeoutError
from .shards import (
    arrow_table,
    chunk_done,
    default_shard_size,
    field_columns,
    finish_store,
    link_store,
    resumed_shard_size,
    scalar_fields,
    sidecar,
    sidecars,
    write_chunk,
)
from .store import CHUNKS, DTYPES, KIND, MANIFEST, ActivationStore, store_problem

log = logging.getLogger(__name__)


def load_records(data: Any, text_field: str = "text", label_field: str = "label") -> list[dict]:
    """Rows from a list, a `Dataset` or a JSON/JSONL file; contrastive pairs become two labelled rows.

    A pair is a record with `positive` and `negative` texts: it yields
    {text_field: positive, label_field: "positive", "pair": i} and the same for the negative.
    """
    from .._core.rows import load_rows

    rows = load_rows(data)
    if rows and "positive" in rows[0] and "negative" in rows[0] and text_field not in rows[0]:
        rows = [
            {text_field: r[side], label_field: side, "pair": i}
            for i, r in enumerate(rows)
            for side in ("positive", "negative")
        ]
    if rows and text_field not in rows[0]:
        raise ConfigError(
            f"Records have no field {text_field!r} (fields: {', '.join(sorted(rows[0]))}). "
            "Set --text-field, or give contrastive pairs with 'positive' and 'negative'."
        )
    return rows


def default_label_field(rows: list[dict], label_field: str | None) -> str:
    """The label field in effect: the one given, else "type" when records have it (contrastive pairs), else "label"."""
    if label_field is not None:
        return label_field
    return "type" if rows and "type" in rows[0] else "label"


def activation_key(
    model: dict,
    tokenizer: dict | None,
    rows: list[dict],
    layers: list[int],
    *,
    positions: str,
    dtype: str,
    text_field: str,
    label_field: str,
    max_length: int | None,
    use_chat_template: bool,
    system_prompt: str | None,
) -> Key:
    """A store's key from model and tokenizer identities: a loaded model's, or the ones remembered for its files."""
    return make_key(
        "activations",
        {
            "model": model,
            "tokenizer": tokenizer,
            "data": {
                "fingerprint": fingerprint_data(rows),
                "n": len(rows),
                "text_field": text_field,
                "label_field": label_field,
            },
            "layers": layers,
            "positions": positions,
            "dtype": dtype,
            "max_length": max_length,
            "template": {"chat_template": use_chat_template, "system_prompt": system_prompt},
        },
    )


def _rank_and_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier(world: int) -> bool:
    import torch.distributed as dist

    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()
        return True
    return False


def cache_activations(
    model: Any,
    tokenizer: Any,
    data: Any,
    folder: str | Path,
    layers: Sequence[int],
    *,
    positions: str = "last",
    dtype: str = "float16",
    text_field: str = "text",
    label_field: str | None = None,
    use_chat_template: bool = False,
    system_prompt: str | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
    shard_size: int | None = None,
    force: bool = False,
    max_age_days: float | None = None,
    clock: Clock = SYSTEM_CLOCK,
    progress: bool = True,
    wait_timeout: float = 3600.0,
    cache: CacheConfig | None = None,
) -> ActivationStore:
    """Extract hidden states at `layers` for every record of `data` into `folder`, or open it if done.

    Args:
        model, tokenizer: any `transformers` causal LM or encoder and its tokenizer.
        data: records with a text field (and usually a label), or contrastive pairs.
        folder: the cache folder (the command's `--output`).
        layers: layer indices, 0..num_layers (see `architecture`).
        positions: "last" non-padding token, "first", "mean" over non-padding tokens, or "all" (a row per token).
        text_field, label_field: record fields; the label field defaults to "type" when present, else "label".
        dtype: "float16", "bfloat16" (kept bit-exact) or "float32".
        batch_size, shard_size: how to run; not in the key, so they may change between runs. `shard_size`
            is examples per chunk (one shard file, and what a killed run loses at most per process); by
            default about 32 MiB of activations, at least 1,024 examples (1,024 with positions="all").
        force: replace a cache in `folder` that was made from other inputs (only the files it lists go), or
            write into a non-empty folder that holds no cache of ours (beside its files, never over them).
        max_age_days, clock: the cache settings as keywords: a store older than `max_age_days` is
            re-extracted (None: never expires); `clock` gives "now". They build `cache` when it is not given.
        cache: the settings as one `CacheConfig`: `max_age` (left out: never expires, as without `cache`),
            `force_recompute` (extract again even from the same inputs; a store made from other inputs
            still needs `force`), `enabled=False` (the same: the store is the result, so it is always
            written) and `clock`. The store lives in `folder` (a `folder` set in the CacheConfig must be
            that one); a store outside the `root` is recorded there (`shards.link_store`), so the
            management commands on that root list, verify and forget it (they never delete it).

    Returns:
        The finished `ActivationStore`.

    Raises:
        ConfigError: bad layers/positions/dtype/fields, `folder` holds another cache (names what differs),
            `folder` is a non-empty folder that is not ours (`force` writes beside its files, never over
            them), or a keyword disagrees with `cache`.
        CacheError: the store cannot be written (a full disk): names the folder and the space needed.
        WaitTimeoutError: other ranks did not finish their chunks within `wait_timeout`.

    A corrupt store in `folder` (a shard altered, truncated, swapped or missing) is a warning: it is
    removed and extracted again.
    """
    import torch

    folder = local_path(folder)  # s3://bucket/acts/run1: extracted into its local copy, uploaded when finished
    cache = settle(
        cache,
        {"max_age_days": max_age_days, "clock": clock},
        {"max_age_days": None, "clock": SYSTEM_CLOCK},
        "cache_activations",
    )
    if cache.folder is not None and local_path(cache.folder) != folder:
        raise ConfigError(
            f"cache_activations got folder={str(folder)!r} and CacheConfig(folder="
            f"{str(cache.folder)!r}); pass the store's folder once, as the folder argument."
        )
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported. Use one of: {', '.join(DTYPES)}.")
    if positions not in POSITIONS:
        raise ConfigError(f"positions={positions!r} is not supported. Use one of: {', '.join(POSITIONS)}.")
    layers = check_layers(model, layers)
    rows = load_records(data, text_field, label_field or "label")
    label_field = default_label_field(rows, label_field)  # contrastive-pair files call it "type"; most "label"
    texts = [str(r[text_field]) for r in rows]
    if use_chat_template:
        from .._models.runners import chat_texts

        texts = chat_texts(texts, tokenizer, system_prompt)
    key = activation_key(
        model_identity(model),
        tokenizer_identity(tokenizer),
        rows,
        layers,
        positions=positions,
        dtype=dtype,
        text_field=text_field,
        label_field=label_field,
        max_length=max_length,
        use_chat_template=use_chat_template,
        system_prompt=system_prompt,
    )
    rank, world = _rank_and_world()
    hit = _clear_the_way(folder, key, force, cache, rank)
    if hit is not None:
        log.info("✅ Loaded activations from cache %s (%d examples, layers %s).", folder, len(rows), layers)
        if rank == 0:
            link_store(folder, cache.resolve_root())  # known to this root too, when it was made under another
        return ActivationStore._of(hit)
    _barrier(world)  # rank 0 has removed what was in the way
    hidden = hidden_size(model)
    need = len(rows) * len(layers) * hidden * (4 if dtype == "float32" else 2)
    need_text = f"{'at least ' if positions == 'all' else 'about '}{need / 1e6:.1f} MB"
    if rank == 0:
        with _writing(folder, need_text):
            tag_folder(folder, required=True)
    if shard_size is None:  # the same on every rank: it depends only on the run's inputs
        shard_size = default_shard_size(len(rows), len(layers), hidden, dtype, positions, world)
    shard_size = resumed_shard_size(folder, key.digest) or shard_size  # a resumed run keeps its chunks
    chunks = [
        (c, c * shard_size, min(len(rows), (c + 1) * shard_size))
        for c in range((len(rows) + shard_size - 1) // shard_size)
    ]
    # a chunk left by an earlier run is hashed: its shard was not yet fsynced when that run stopped
    mine = [c for c in chunks if c[0] % world == rank and not chunk_done(folder, c[0], key.digest, "hash", c[1:])]
    fields, columns = field_columns(rows, scalar_fields(rows, text_field))
    device = next(model.parameters()).device
    from tqdm.auto import tqdm

    total = sum(end - start for _, start, end in mine)
    reused = len(rows) - total if world == 1 else None
    log.info(
        "🔄 Extracting layers %s (%s, %s) for %d examples%s into %s",
        layers,
        positions,
        dtype,
        total,
        f" ({reused} already cached)" if reused else f" on rank {rank}/{world}" if world > 1 else "",
        folder,
    )
    with (
        tqdm(
            total=total,
            desc=f"Extracting (rank {rank})" if world > 1 else "Extracting",
            unit="ex",
            disable=not progress,
        ) as bar,
        torch.no_grad(),
    ):
        for chunk, start, end in mine:
            pooled = []
            for offset, batch in batches(
                texts[start:end], tokenizer, batch_size, max_length, add_special_tokens=not use_chat_template
            ):
                batch = {k: v.to(device) for k, v in batch.items()}
                hidden_states = capture(model, batch, layers)
                out = pool(hidden_states, batch["attention_mask"], batch["input_ids"], positions)
                out.layers = {k: v.cpu() for k, v in out.layers.items()}
                pooled.append((_to_cpu(out), offset))
                bar.update(batch["input_ids"].shape[0])
            table = arrow_table(pooled, start, rows, fields, layers, dtype, hidden, columns)
            with _writing(folder, need_text):
                write_chunk(folder, chunk, start, end, table, key, shard_size)
    if not _barrier(world) and world > 1:
        _wait_for(
            lambda: _finished(folder) or all(chunk_done(folder, c, key.digest, span=(s, e)) for c, s, e in chunks),
            wait_timeout,
            folder,
        )
    if rank == 0:
        with _writing(folder, need_text):
            finish_store(folder, chunks, rows, fields, label_field, key, layers, positions, dtype, hidden,
                         shard_size, clock=cache.clock, columns=columns)
        link_store(folder, cache.resolve_root())  # a store outside the root: `ls` there lists it
    if not _barrier(world) and rank != 0:  # every rank passes the same barriers
        _wait_for(lambda: _finished(folder), wait_timeout, folder)
    return ActivationStore(folder)


def _to_cpu(pooled: Any) -> Any:
    pooled.example = pooled.example.cpu()
    if pooled.position is not None:
        pooled.position, pooled.token_id = pooled.position.cpu(), pooled.token_id.cpu()
    return pooled


def _clear_the_way(folder: Path, key: Key, force: bool, cache: CacheConfig, rank: int) -> entry.Entry | None:
    """The finished store for `key` in `folder`, or None after rank 0 removed whatever was in the way.

    A killed run of the same inputs is resumed, unless `cache` says to recompute.

    Raises:
        ConfigError: `folder` holds a cache made from other inputs and `force` is off.
    """
    remote.refresh(folder / MANIFEST)  # a store on object storage: its finished copy, if any (else no-op)
    claim_folder(folder, force)
    found, problem = entry.inspect(folder / MANIFEST, "stamp")  # never deletes: we decide below
    other = found is not None and found.kind != KIND
    problem = problem or (None if found is None or other else store_problem(found))
    changes: list[str] | None = None
    if problem:
        log.warning("Corrupt activation cache in %s (%s); removing it and extracting again.", folder, problem)
    elif found is not None and found.key["digest"] == key.digest and not other:
        now = cache.clock()
        if not cache.reads:
            log.info(
                "Activation cache %s: %s; extracting again.",
                folder,
                "force_recompute is set" if cache.force_recompute else "the cache is disabled",
            )
        elif not cache.expired(found.created_at, now):
            return found
        else:
            log.info(
                "Activation cache %s is %s old (max %s days): expired, extracting again.",
                folder,
                describe_age(now - found.created_at),
                cache.max_age_days,
            )
    elif found is not None:
        changes = [f"it holds a {found.kind} entry"] if other else diff_inputs(found.key["inputs"], key.inputs)
    else:
        side = next(sidecars(folder), None)  # a killed run (any chunk it finished): resume it if the same inputs
        if side is None or (side["key"]["digest"] == key.digest and cache.reads):
            return None
        if side["key"]["digest"] != key.digest:
            changes = diff_inputs(side["key"]["inputs"], key.inputs)
    if changes is not None:
        if not force:
            raise ConfigError(
                f"{folder} holds activations made from other inputs ({'; '.join(changes[:5])}). "
                "Use another --output, or --force to replace it."
            )
        log.warning("Replacing the activation cache in %s (%s).", folder, "; ".join(changes[:3]))
    if rank == 0:
        _remove_store(folder)
    return None


_STORE_NAMES = re.compile(r"(manifest|metadata|layer_info|state|dataset_info)\.json|data-\d{5}\.arrow|\.chunks")


def claim_folder(folder: Path, force: bool) -> None:
    """Refuse to write a store into a folder that is not ours, so no file of the user's is ever replaced.

    Ours: missing, empty, marked with our CACHEDIR.TAG, or holding a manifest of ours. A `manifest.json`
    that is not one of ours is never removed nor overwritten, even with `force`. Another non-empty folder
    needs `force`, which writes the store beside its files, and is refused even then when a file there
    has a name the store writes. Inside a folder marked as ours, the store's file names are the store's.

    Raises:
        ConfigError: `folder` is not ours (names what is there and the fix).
    """
    manifest = folder / MANIFEST
    if (manifest.exists() or manifest.is_symlink()) and not entry.is_entry_file(manifest):
        raise ConfigError(
            f"{manifest} is not an activation cache of hf_cachehooks (a file of yours, or a cache written by "
            "an earlier version); it is never removed or overwritten, even with --force. Move it away, or "
            "choose another --output."
        )
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise ConfigError(f"{folder} is a file, not a folder; give --output a folder for the store.") from None
    if not names or is_tagged(folder) or entry.is_entry_file(manifest):
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if not force:
        raise ConfigError(
            f"{folder} is not empty and holds no activation cache of hf_cachehooks (no CACHEDIR.TAG of ours; "
            f"it has {shown}). Choose a new or empty --output folder, or pass --force (force=True) to write "
            "the store beside these files, which are never touched."
        )
    clash = [name for name in names if _STORE_NAMES.fullmatch(name)]
    if clash:
        raise ConfigError(
            f"{folder} holds {', '.join(clash[:5])}, which the activation store would overwrite; hf_cachehooks "
            "never overwrites a file it did not write, even with --force. Move them away, or choose another "
            "--output."
        )
    log.warning("Writing an activation store into %s beside files that are not ours (--force); they stay.", folder)


def _remove_store(folder: Path) -> int:
    """Delete the store in `folder`: the files its manifest lists, a killed run's shards and `.chunks/`; no others.

    A file goes only while it holds what was recorded for it (see `entry.remove_entry`): a killed run's
    shard is checked against its sidecar.
    """
    chunks = folder / CHUNKS
    shards = {} if chunks.is_symlink() or not chunks.is_dir() else {
        f"{p.stem}.arrow": {"bytes": side["bytes"], "xxh3": side["content_hash"], "stamp": side.get("stamp")}
        for p in sorted(chunks.iterdir())
        if re.fullmatch(r"data-\d{5}\.json", p.name) and (side := sidecar(folder, int(p.stem[5:]))) is not None
    }
    if entry.is_entry_file(folder / MANIFEST):
        freed = entry.remove_entry(folder / MANIFEST, also=shards)
    else:  # a killed run: no manifest, only the shards its sidecars record
        freed = 0
        for name, rec in shards.items():
            if entry.check_file(folder, name, rec, "stamp") is None:
                with contextlib.suppress(OSError):
                    freed += (folder / name).stat().st_size
                    (folder / name).unlink()
    if chunks.is_dir() and not chunks.is_symlink():
        shutil.rmtree(chunks, ignore_errors=True)
    return freed


@contextlib.contextmanager
def _writing(folder: Path, need: str) -> Iterator[None]:
    """Turn a failed write (a full disk) into a CacheError naming the folder: the store is the result."""
    try:
        yield
    except CacheError:
        raise
    except OSError as exc:
        free = ""
        with contextlib.suppress(OSError):
            free = f", {shutil.disk_usage(folder).free / 1e6:.1f} MB free there"
        raise CacheError(
            f"Cannot write the activation store in {folder} ({exc.strerror or exc}). It needs {need}{free}; "
            "free some space, or choose another --output."
        ) from exc


def _finished(folder: Path) -> bool:
    return entry.is_entry_file(folder / MANIFEST)


def _wait_for(ready: Any, timeout: float, folder: Path) -> None:
    deadline = time.time() + timeout
    while not ready():
        if time.time() > deadline:
            raise WaitTimeoutError(f"Other processes did not finish their chunks in {folder} within {timeout:.0f}s.")
        time.sleep(0.5)


def manifest_text(folder: Path) -> str:
    """The manifest as pretty JSON (for `info --json`); never deletes anything."""
    try:
        doc: Any = unseal((Path(folder) / MANIFEST).read_bytes())
    except (OSError, CorruptEntryError):
        doc = None
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()
