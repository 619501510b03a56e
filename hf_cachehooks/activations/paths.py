"""Activation stores for a model given by path or Hub name: a finished store is found without loading the model.

The store's key needs the model's and tokenizer's identity. For a local folder (or a Hub name in the local
Hub cache) the identity computed when the store was made is remembered against a hash of the model's files
and how they are loaded (the identity memo of `_models.identity`, which `evaluate_model` keeps too, here
under load options of its own), so a later run computes the key from the files alone and opens the store
in milliseconds. A changed model file changes that hash: a miss, and the model loads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._core import entry, remote
from .._core.cache_config import CacheConfig, settle
from .._core.freshness import SYSTEM_CLOCK
from .._core.keys import Key
from .._core.store import local_path
from .._models.identity import files_state, generation_defaults, remember_identity, remembered_identity
from ..errors import ConfigError
from .store import KIND, MANIFEST, ActivationStore, store_problem
from .writer import activation_key, cache_activations, claim_folder, default_label_field, load_records

log = logging.getLogger(__name__)

HEADS = ("causal", "base")


def load_options(head: str, model_dtype: str, gguf_file: str | None, load_kwargs: Mapping[str, Any] | None) -> dict:
    """How the path becomes the model whose identity is remembered (the memo's key, not the store's).

    The task names this workflow, so a memo written by `evaluate_model` (which may load with other
    settings) is never read here, nor the other way round.
    """
    return {
        "task": f"activations-{head}",
        "dtype": model_dtype,
        "gguf_file": gguf_file,
        "load_kwargs": dict(load_kwargs or {}),
    }


def find_store(folder: str | Path, key: Key, cache: CacheConfig) -> ActivationStore | None:
    """The finished, fresh store of `key` in `folder`, or None; reads only, never removes anything.

    A folder on object storage (a URL) is read from its local copy, brought in step first, as every store reader does.
    """
    manifest = local_path(folder) / MANIFEST
    remote.refresh(manifest)
    found, problem = entry.inspect(manifest, "stamp")
    if found is None or problem or found.kind != KIND or found.key.get("digest") != key.digest:
        return None
    if store_problem(found) or not cache.reads or cache.expired(found.created_at, cache.clock()):
        return None
    return ActivationStore._of(found)


def _settings(options: Mapping[str, Any]) -> CacheConfig:
    return settle(
        options.get("cache"),
        {"max_age_days": options.get("max_age_days"), "clock": options.get("clock", SYSTEM_CLOCK)},
        {"max_age_days": None, "clock": SYSTEM_CLOCK},
        "cache_activations",
    )


def remembered_store(
    model: str,
    data: Any,
    folder: str | Path,
    layers: Sequence[int],
    *,
    head: str = "causal",
    model_dtype: str = "float32",
    gguf_file: str | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
    positions: str = "last",
    dtype: str = "float16",
    text_field: str = "text",
    label_field: str | None = None,
    use_chat_template: bool = False,
    system_prompt: str | None = None,
    max_length: int | None = None,
    **options: Any,
) -> ActivationStore | None:
    """The finished store for these inputs when the model's identity is remembered for its files; else None.

    Loads nothing: the key comes from the remembered identity and the data. Arguments as in
    `cache_activations_from_path`.
    """
    cache = _settings(options)
    root = cache.resolve_root()
    state = files_state(str(model), load_options(head, model_dtype, gguf_file, load_kwargs), root)
    identity = remembered_identity(state, root)
    if identity is None:
        return None
    rows = load_records(data, text_field, label_field or "label")
    key = activation_key(
        identity["model"],
        identity["tokenizer"],
        rows,
        sorted({int(x) for x in layers}),
        positions=positions,
        dtype=dtype,
        text_field=text_field,
        label_field=default_label_field(rows, label_field),
        max_length=max_length,
        use_chat_template=use_chat_template,
        system_prompt=system_prompt,
    )
    store = find_store(folder, key, cache)
    if store is not None:
        log.info(
            "✅ Loaded activations from cache %s (%d examples, layers %s; model recognised by its files, not loaded).",
            folder,
            len(rows),
            store.layers,
        )
    return store


def cache_activations_from_path(
    model: str,
    data: Any,
    folder: str | Path,
    layers: Sequence[int],
    *,
    head: str = "causal",
    model_dtype: str = "float32",
    gguf_file: str | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> ActivationStore:
    """`cache_activations` for a model folder or Hub name: the weights load only on a miss.

    Args:
        model: a local model folder, or a Hub name present in the local Hub cache (any other name always
            loads, since its files cannot be recognised).
        head: "causal" (a language model) or "base" (the bare model, e.g. an encoder).
        model_dtype, gguf_file, load_kwargs: how the model loads (`load_model`'s `dtype`, `gguf_file` and
            `from_pretrained` options); part of what the files are remembered with.
        **options: every other `cache_activations` argument (positions, dtype, text_field, ..., cache).

    Returns:
        The finished `ActivationStore`.

    Raises:
        ConfigError: as `cache_activations`, or an unknown head.

    Example:
        >>> store = cache_activations_from_path("path/to/model", "pairs.json", "acts/run1", [10, 20])
        >>> store = cache_activations_from_path("path/to/model", "pairs.json", "acts/run1", [10, 20])  # no load
    """
    if head not in HEADS:
        raise ConfigError(f"head={head!r} is not one of {', '.join(HEADS)}.")
    store = remembered_store(
        model,
        data,
        folder,
        layers,
        head=head,
        model_dtype=model_dtype,
        gguf_file=gguf_file,
        load_kwargs=load_kwargs,
        **options,
    )
    if store is not None:
        return store
    from .._models.inference import load_planned, plan_load

    claim_folder(local_path(folder), bool(options.get("force", False)))  # a user's folder: refused before loading
    root = _settings(options).resolve_root()
    state = files_state(str(model), load_options(head, model_dtype, gguf_file, load_kwargs), root)  # before loading
    # the same load plan as evaluate_model: this rank's GPU and its attention ladder; on CPU nothing changes
    loaded, tokenizer, _ = load_planned(
        str(model), plan_load(dtype=model_dtype), head=head, gguf_file=gguf_file, **dict(load_kwargs or {})
    )
    store = cache_activations(loaded, tokenizer, data, folder, layers, **options)
    inputs = store.key_inputs  # the identities the store was keyed by: remembered, not computed twice
    remember_identity(
        state,
        {
            "model": inputs["model"],
            "tokenizer": inputs["tokenizer"],
            "generation_defaults": generation_defaults(loaded),
        },
        root,
    )
    return store
