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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .._core import entry, remote
from .._core.cache_config import CacheConfig
from .._core.freshness import SYSTEM_CLOCK
from .._core.keys import Key
from .._core.store import local_path
from .._models.identity import files_state, generation_defaults, remember_identity, remembered_identity
from ..errors import ConfigError
from .folder import claim_folder
from .spec import ExtractionSpec
from .store import KIND, MANIFEST, ActivationStore, store_problem
from .writer import fill_store, store_settings

log = logging.getLogger(__name__)

HEADS = ("causal", "base")
_SPEC = frozenset(f.name for f in fields(ExtractionSpec)) - {"layers"}
_RUN = frozenset({"force", "progress", "wait_timeout"})  # fill_store's own keywords
_CACHE = frozenset({"cache", "max_age_days", "clock"})


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


@dataclass(frozen=True)
class ModelPath:
    """A model folder or Hub name and how it loads: what its identity is remembered under.

    Args:
        name: a local model folder, or a Hub name present in the local Hub cache (any other name always
            loads, since its files cannot be recognised).
        head: "causal" (a language model) or "base" (the bare model, e.g. an encoder).
        dtype, gguf_file, load_kwargs: `load_model`'s `dtype`, `gguf_file` and `from_pretrained` options.

    Raises:
        ConfigError: an unknown head.
    """

    name: str
    head: str = "causal"
    dtype: str = "float32"
    gguf_file: str | None = None
    load_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ConfigError(f"head={self.head!r} is not one of {', '.join(HEADS)}.")

    def state(self, root: Path) -> str | None:
        """The hash of the model's files and load options (None: not recognisable without loading)."""
        return files_state(self.name, load_options(self.head, self.dtype, self.gguf_file, self.load_kwargs), root)


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


def find_remembered(
    model: ModelPath, rows: list[dict], folder: str | Path, spec: ExtractionSpec, cache: CacheConfig
) -> tuple[ActivationStore | None, str | None]:
    """The finished store when the model's identity is remembered for its files (else None), and the files' state.

    Loads nothing: the key comes from the remembered identity and `rows` (from `spec.records`). The state is
    what `extract_from_path` remembers the identity under after a load, so the files are hashed once.
    """
    root = cache.resolve_root()
    state = model.state(root)
    identity = remembered_identity(state, root)
    if identity is None:
        return None, state
    store = find_store(folder, spec.key(identity["model"], identity["tokenizer"], rows), cache)
    if store is not None:
        log.info(
            "✅ Loaded activations from cache %s (%d examples, layers %s; model recognised by its files, not loaded).",
            folder,
            len(rows),
            store.layers,
        )
    return store, state


def extract_from_path(
    model: ModelPath,
    rows: list[dict],
    folder: str | Path,
    spec: ExtractionSpec,
    cache: CacheConfig,
    state: str | None,
    *,
    force: bool = False,
    progress: bool = True,
    wait_timeout: float = 3600.0,
) -> ActivationStore:
    """The miss after `find_remembered`: load the model, fill the store, remember the identity under `state`.

    Raises:
        As `cache_activations`; a folder that is not ours is refused before the model loads.
    """
    from .._models.inference import load_planned, plan_load

    folder = local_path(folder)
    claim_folder(folder, force)  # a user's folder: refused before loading
    # the same load plan as evaluate_model: this rank's GPU and its attention ladder; on CPU nothing changes
    loaded, tokenizer, _ = load_planned(
        model.name, plan_load(dtype=model.dtype), head=model.head, gguf_file=model.gguf_file, **dict(model.load_kwargs)
    )
    store = fill_store(
        loaded, tokenizer, rows, folder, spec, cache, force=force, progress=progress, wait_timeout=wait_timeout
    )
    inputs = store.key_inputs  # the identities the store was keyed by: remembered, not computed twice
    identity = {
        "model": inputs["model"],
        "tokenizer": inputs["tokenizer"],
        "generation_defaults": generation_defaults(loaded),
    }
    remember_identity(state, identity, cache.resolve_root())
    return store


def _request(
    owner: str, folder: str | Path, layers: Sequence[int], options: Mapping[str, Any]
) -> tuple[Path, ExtractionSpec, CacheConfig, dict]:
    """`cache_activations`' keywords sorted out: the local folder, the spec, the cache settings, the run's own."""
    unknown = sorted(set(options) - _SPEC - _RUN - _CACHE)
    if unknown:
        raise TypeError(f"{owner}() got unexpected keyword arguments: {', '.join(unknown)}")
    folder, cache = store_settings(
        folder, options.get("cache"), max_age_days=options.get("max_age_days"), clock=options.get("clock", SYSTEM_CLOCK)
    )
    spec = ExtractionSpec(tuple(layers), **{name: v for name, v in options.items() if name in _SPEC})
    return folder, spec, cache, {name: v for name, v in options.items() if name in _RUN}


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
    **options: Any,
) -> ActivationStore | None:
    """The finished store for these inputs when the model's identity is remembered for its files; else None.

    Loads nothing: the key comes from the remembered identity and the data. Arguments as in
    `cache_activations_from_path` (its run keywords, such as `force`, are accepted and play no part).
    """
    path = ModelPath(str(model), head, model_dtype, gguf_file, dict(load_kwargs or {}))
    folder, spec, cache, _ = _request("remembered_store", folder, layers, options)
    return find_remembered(path, spec.records(data), folder, spec, cache)[0]


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

    The data is read once and the model's files are hashed once, whether the store is found or made.

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
    path = ModelPath(str(model), head, model_dtype, gguf_file, dict(load_kwargs or {}))
    folder, spec, cache, run = _request("cache_activations_from_path", folder, layers, options)
    rows = spec.records(data)
    store, state = find_remembered(path, rows, folder, spec, cache)
    return store if store is not None else extract_from_path(path, rows, folder, spec, cache, state, **run)
