"""Filling an activation store: chunked, resumable, and shared out across processes.

    DIR/                               (the finished layout is drawn in `activations`)
    ├── data-00000.arrow …             renamed into place complete
    └── .chunks/data-00000.json …      sealed sidecar per finished chunk: size, xxh3, stamp, key

Examples are cut into chunks of `shard_size`; chunk c goes to rank c % world_size, so any number of
processes (torchrun, accelerate launch) fills the same chunks and the shards read back in dataset
order. A chunk's Arrow file is renamed into place complete and then confirmed by its sidecar; a
killed run redoes only unconfirmed chunks. Rank 0 writes the side files, then the manifest last
(`entry.commit`, listing every file), then deletes `.chunks/`. What is already in the folder (a finished
store, a killed run, another cache, a user's files) is settled by `folder.clear_the_way`. A `CacheConfig`
passed as `cache` sets expiry (`max_age`), re-extraction of the same inputs (`force_recompute`) and the
clock; its root records a finished store that lies outside it (`link_store`).

One run goes `_prepare` (key, launch) -> `clear_the_way` (open, resume, replace or refuse) -> `_plan`
(chunks, this rank's share) -> `_extract` (forward passes, one shard per chunk) -> `_finish` (barriers, manifest).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .._core import entry
from .._core.cache_config import CacheConfig, settle
from .._core.freshness import SYSTEM_CLOCK, Clock
from .._core.keys import Key
from .._core.launch import World, barrier, current_world
from .._core.store import local_path, tag_folder
from .._models.architecture import hidden_size
from .._models.extraction import batches, capture, check_layers, pool
from .._models.identity import model_identity, tokenizer_identity
from ..errors import CacheError, ConfigError, WaitTimeoutError
from .folder import clear_the_way
from .shards import (
    arrow_table,
    chunk_done,
    default_shard_size,
    field_columns,
    finish_store,
    link_store,
    resumed_shard_size,
    scalar_fields,
    write_chunk,
)
from .spec import ExtractionSpec, default_label_field
from .store import MANIFEST, ActivationStore

log = logging.getLogger(__name__)


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
        cache: the cache settings, in one place: `max_age` (left out: never expires, as without `cache`),
            `force_recompute` (extract again even from the same inputs; a store made from other inputs
            still needs `force`), `enabled=False` (the same: the store is the result, so it is always
            written) and `clock`. The store lives in `folder` (a `folder` set in the CacheConfig must be
            that one); a store outside the `root` is recorded there (`shards.link_store`), so the
            management commands on that root list, verify and forget it (they never delete it).
        max_age_days, clock: the older spellings of `CacheConfig(max_age=..., clock=...)`, still accepted.

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

    Example:
        >>> store = cache_activations(model, tokenizer, "pairs.json", "acts/run1", [10, 20])
    """
    folder, cache = store_settings(folder, cache, max_age_days=max_age_days, clock=clock)
    spec = ExtractionSpec(
        tuple(layers),
        positions=positions,
        dtype=dtype,
        text_field=text_field,
        label_field=label_field,
        use_chat_template=use_chat_template,
        system_prompt=system_prompt,
        max_length=max_length,
        batch_size=batch_size,
        shard_size=shard_size,
    )
    rows = spec.records(data)
    return fill_store(
        model, tokenizer, rows, folder, spec, cache, force=force, progress=progress, wait_timeout=wait_timeout
    )


def store_settings(
    folder: str | Path, cache: CacheConfig | None, *, max_age_days: float | None = None, clock: Clock = SYSTEM_CLOCK
) -> tuple[Path, CacheConfig]:
    """The store's local folder and the `CacheConfig` in effect (`cache`, or the one the old keywords describe).

    s3://bucket/acts/run1 becomes its local copy: the store is extracted there and uploaded when finished.

    Raises:
        ConfigError: a keyword disagrees with `cache`, or `cache` names another folder.
    """
    folder = local_path(folder)
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
    return folder, cache


def fill_store(
    model: Any,
    tokenizer: Any,
    rows: list[dict],
    folder: Path,
    spec: ExtractionSpec,
    cache: CacheConfig,
    *,
    force: bool = False,
    progress: bool = True,
    wait_timeout: float = 3600.0,
) -> ActivationStore:
    """`cache_activations` for records already loaded (`spec.records`) into a folder from `store_settings`.

    Raises:
        As `cache_activations`.
    """
    run = _prepare(model, tokenizer, rows, folder, spec, cache)
    found = clear_the_way(folder, run.key, force, cache, run.world.rank)
    if found is not None:
        log.info("✅ Loaded activations from cache %s (%d examples, layers %s).", folder, len(rows), run.layers)
        if run.world.is_main:
            link_store(folder, cache.resolve_root())  # known to this root too, when it was made under another
        return ActivationStore._of(found)
    barrier(run.world)  # rank 0 has removed what was in the way
    plan = _plan(run, model)
    _extract(run, plan, model, tokenizer, progress)
    return _finish(run, plan, wait_timeout)


@dataclass(frozen=True)
class _Run:
    """One extraction's inputs: the checked settings, the records and their texts, the key, the launch."""

    folder: Path
    spec: ExtractionSpec  # layers checked against the model, label field settled
    cache: CacheConfig
    rows: list[dict]
    texts: list[str]  # what the model reads: the text fields, in the chat template when asked
    key: Key
    world: World

    @property
    def layers(self) -> list[int]:
        return list(self.spec.layers)

    @property
    def label_field(self) -> str:
        return default_label_field(self.rows, self.spec.label_field)


@dataclass(frozen=True)
class _Plan:
    """How the run is cut: the chunks (chunk, start, end), this rank's unfinished share, the columns."""

    hidden: int
    need: str  # the store's size, for a full-disk message
    shard_size: int
    chunks: list[tuple[int, int, int]]
    mine: list[tuple[int, int, int]]
    fields: dict[str, Any]
    columns: dict[str, Any]


def _prepare(
    model: Any, tokenizer: Any, rows: list[dict], folder: Path, spec: ExtractionSpec, cache: CacheConfig
) -> _Run:
    """Check the layers against the model, settle the label field, make the texts and the key."""
    spec = replace(
        spec, layers=tuple(check_layers(model, spec.layers)), label_field=default_label_field(rows, spec.label_field)
    )  # contrastive-pair files call the label "type"; most "label"
    texts = [str(r[spec.text_field]) for r in rows]
    if spec.use_chat_template:
        from .._models.runners import chat_texts

        texts = chat_texts(texts, tokenizer, spec.system_prompt)
    key = spec.key(model_identity(model), tokenizer_identity(tokenizer), rows)
    return _Run(folder, spec, cache, rows, texts, key, current_world())


def _plan(run: _Run, model: Any) -> _Plan:
    """Tag the folder (rank 0) and cut the run into chunks; this rank takes chunk c when c % size == rank."""
    spec, folder, rows, world = run.spec, run.folder, run.rows, run.world
    hidden = hidden_size(model)
    need = len(rows) * len(spec.layers) * hidden * (4 if spec.dtype == "float32" else 2)
    need_text = f"{'at least ' if spec.positions == 'all' else 'about '}{need / 1e6:.1f} MB"
    if world.is_main:
        with _writing(folder, need_text):
            tag_folder(folder, required=True)
    shard_size = spec.shard_size  # the default is the same on every rank: it depends only on the run's inputs
    if shard_size is None:
        shard_size = default_shard_size(len(rows), len(spec.layers), hidden, spec.dtype, spec.positions, world.size)
    shard_size = resumed_shard_size(folder, run.key.digest) or shard_size  # a resumed run keeps its chunks
    chunks = [
        (c, c * shard_size, min(len(rows), (c + 1) * shard_size))
        for c in range((len(rows) + shard_size - 1) // shard_size)
    ]
    # a chunk left by an earlier run is hashed: its shard was not yet fsynced when that run stopped
    mine = [
        c
        for c in chunks
        if c[0] % world.size == world.rank and not chunk_done(folder, c[0], run.key.digest, "hash", c[1:])
    ]
    fields, columns = field_columns(rows, scalar_fields(rows, spec.text_field))
    return _Plan(hidden, need_text, shard_size, chunks, mine, fields, columns)


def _extract(run: _Run, plan: _Plan, model: Any, tokenizer: Any, progress: bool) -> None:
    """Run the model over this rank's chunks; each chunk becomes one shard and its sidecar."""
    import torch
    from tqdm.auto import tqdm

    spec, rank, world = run.spec, run.world.rank, run.world.size
    device = next(model.parameters()).device
    total = sum(end - start for _, start, end in plan.mine)
    reused = len(run.rows) - total if world == 1 else None
    log.info(
        "🔄 Extracting layers %s (%s, %s) for %d examples%s into %s",
        run.layers,
        spec.positions,
        spec.dtype,
        total,
        f" ({reused} already cached)" if reused else f" on rank {rank}/{world}" if world > 1 else "",
        run.folder,
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
        for chunk, start, end in plan.mine:
            pooled = []
            for offset, batch in batches(
                run.texts[start:end],
                tokenizer,
                spec.batch_size,
                spec.max_length,
                add_special_tokens=not spec.use_chat_template,
            ):
                batch = {k: v.to(device) for k, v in batch.items()}
                hidden_states = capture(model, batch, run.layers)
                out = pool(hidden_states, batch["attention_mask"], batch["input_ids"], spec.positions)
                out.layers = {k: v.cpu() for k, v in out.layers.items()}
                pooled.append((_to_cpu(out), offset))
                bar.update(batch["input_ids"].shape[0])
            table = arrow_table(pooled, start, run.rows, plan.fields, run.layers, spec.dtype, plan.hidden, plan.columns)
            with _writing(run.folder, plan.need):
                write_chunk(run.folder, chunk, start, end, table, run.key, plan.shard_size)


def _finish(run: _Run, plan: _Plan, wait_timeout: float) -> ActivationStore:
    """Wait for every rank's chunks, then rank 0 writes the manifest; every rank passes the same barriers.

    Under a process group the waits are barriers; ranks started without one poll the disk instead.
    """
    folder, key, world, spec = run.folder, run.key, run.world, run.spec
    if not barrier(world) and world.size > 1:
        _wait_for(
            lambda: _finished(folder) or all(chunk_done(folder, c, key.digest, span=(s, e)) for c, s, e in plan.chunks),
            wait_timeout,
            folder,
        )
    if world.is_main:
        with _writing(folder, plan.need):
            finish_store(
                folder,
                plan.chunks,
                run.rows,
                plan.fields,
                run.label_field,
                key,
                run.layers,
                spec.positions,
                spec.dtype,
                plan.hidden,
                plan.shard_size,
                clock=run.cache.clock,
                columns=plan.columns,
            )
        link_store(folder, run.cache.resolve_root())  # a store outside the root: `ls` there lists it
    if not barrier(world) and not world.is_main:
        _wait_for(lambda: _finished(folder), wait_timeout, folder)
    return ActivationStore(folder)


def _to_cpu(pooled: Any) -> Any:
    pooled.example = pooled.example.cpu()
    if pooled.position is not None:
        pooled.position, pooled.token_id = pooled.position.cpu(), pooled.token_id.cpu()
    return pooled


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
            "free some space, or choose another folder=."
        ) from exc


def _finished(folder: Path) -> bool:
    return entry.is_entry_file(folder / MANIFEST)


def _wait_for(ready: Callable[[], bool], timeout: float, folder: Path) -> None:
    """Poll `ready` every half second (ranks started without a process group share only the disk)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise WaitTimeoutError(f"Other processes did not finish their chunks in {folder} within {timeout:.0f}s.")
        time.sleep(0.5)
