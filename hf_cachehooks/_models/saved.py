"""What loading a just-saved model folder would compute, worked out from the live model that saved it.

`remember_saved_model` records, for the files state of a checkpoint folder (`identity.files_state`), the
identity `evaluate_model(folder)` would record after loading that folder, so a later evaluation by path
(`hf-cachehooks eval-checkpoints`) knows its key without loading the weights. The identity is taken from the
live model only where that is provably what loading computes:

- every tensor in the folder's safetensors equals the live one (dtype, shape, bytes), and every live tensor
  missing from the files is a tied weight the load ties back (`all_tied_weights_keys`), sharing storage;
- the parameters are in the dtype the load asks for, and the buffers are float32 (a model cast with `.to()`
  has cast buffers, such as RoPE's `inv_freq`, that a load in that dtype recomputes in float32);
- the class is the one the loader's Auto class picks, the saved config hashes as the live one, and the
  tokenizer is the folder's own (loaded from its files: no weights);
- no adapter, quantisation, GGUF, remote code, `.bin` weights, subfolder or other load keyword.

Anything else remembers nothing: the by-path run then loads the folder and computes (a miss, never a wrong hit).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from .identity import (
    config_hash,
    files_state,
    generation_defaults,
    model_identity,
    remember_identity,
    tokenizer_identity,
)
from .inference import resolve_dtype
from .loading import HEADS, LoadSettings, load_options
from .sources import split_hub_path

log = logging.getLogger(__name__)

# load keywords that change nothing for a local folder (where it is, who may read it)
_HARMLESS_LOAD_KWARGS = {"local_files_only", "token", "cache_dir", "revision"}
_TASK_HEADS = {"generation": "causal", "classification": "classification"}


class PathSettings(LoadSettings, Protocol):
    """How a model given by path is loaded and placed (`EvalConfig` is one)."""

    @property
    def device(self) -> str | None: ...


def path_load_options(settings: PathSettings) -> dict:
    """The load options `evaluate_model` keys a model path's files state with, for these settings.

    Example:
        >>> path_load_options(EvalConfig(model_dtype="bfloat16"))["dtype"]  # doctest: +SKIP
        'bfloat16'
    """
    return load_options(settings, resolve_dtype(settings.model_dtype, settings.device))


def remember_saved_model(
    model: Any, tokenizer: Any, folder: str | os.PathLike, root: str | os.PathLike, load_options: Mapping | None = None
) -> dict | None:
    """Remember, for the folder `model` was just saved to, the identity loading that folder would compute.

    Args:
        model: the live model, unwrapped (no DDP / Accelerate wrapper), right after `save_pretrained(folder)`
            or `trainer.save_model(folder)`.
        tokenizer: the live tokenizer; the identity uses the one saved in `folder` (what a load reads), and
            a difference is logged.
        folder: the checkpoint folder, spelled as `evaluate_model` will be given it.
        root: the cache root (`CacheConfig.resolve_root()`).
        load_options: how the folder will be loaded: `path_load_options(eval_config)`; None means a default
            `EvalConfig` (generation, float32 on CPU / bfloat16 on a bf16 GPU).

    Returns:
        The identity remembered, or None when none could be proven (the reason is logged at INFO).

    Example:
        >>> trainer.save_model(folder)
        >>> remember_saved_model(model, tokenizer, folder, root, path_load_options(config))
    """
    options = dict(load_options) if load_options is not None else _default_options()
    path = os.fspath(folder)
    try:
        why, loaded_tokenizer = _why_not(model, path, options)
    except Exception as exc:  # anything unexpected while checking: never a memo we cannot prove
        why, loaded_tokenizer = f"checking it failed ({type(exc).__name__}: {exc})", None
    if why is not None:
        log.info("Not remembering the identity of %s (%s): evaluating it by path will load it.", path, why)
        return None
    state = files_state(path, options, Path(root))
    if state is None:
        return None
    ident = model_identity(model)
    ident["name"], ident["revision"] = split_hub_path(path)  # as loading names it (`from_pretrained(path)`)
    saved_tokenizer = tokenizer_identity(loaded_tokenizer)
    if tokenizer is not None and tokenizer_identity(tokenizer) != saved_tokenizer:
        log.info("The tokenizer saved in %s differs from the live one: its identity is the saved one's.", path)
    identity = {"model": ident, "tokenizer": saved_tokenizer, "generation_defaults": generation_defaults(model)}
    remember_identity(state, identity, Path(root))
    log.info("Remembered the identity of %s (no load needed to evaluate it by path).", path)
    return identity


def _default_options() -> dict:
    return {"task": "generation", "dtype": resolve_dtype(None, None), "gguf_file": None, "load_kwargs": {}}


def _why_not(model: Any, folder: str, options: Mapping) -> tuple[str | None, Any]:
    """Why the live model's identity may not stand for `folder` loaded with `options` (None: it may), and
    the folder's tokenizer when it may."""
    kwargs = options.get("load_kwargs") or {}
    if options.get("gguf_file"):
        return "it is loaded from a GGUF file", None
    if set(kwargs) - _HARMLESS_LOAD_KWARGS:
        return f"load_kwargs {sorted(set(kwargs) - _HARMLESS_LOAD_KWARGS)} change what loads", None
    head = _TASK_HEADS.get(str(options.get("task")))
    if head is None:
        return f"task {options.get('task')!r} is not one it knows", None
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return "the folder has no config.json", None
    if os.path.isfile(os.path.join(folder, "adapter_config.json")) or getattr(model, "peft_config", None):
        return "it is a PEFT adapter (loaded over its base)", None
    config = getattr(model, "config", None)
    if config is None:
        return f"{type(model).__name__} has no config (unwrap it from DDP / Accelerate first)", None
    if getattr(config, "quantization_config", None) is not None or getattr(config, "auto_map", None):
        return "it is quantised or needs remote code", None
    for module in model.modules():  # RoPE variants that rewrite inv_freq during a forward
        rope = str(getattr(module, "rope_type", ""))
        if "dynamic" in rope or "longrope" in rope:
            return f"its rope_type {rope!r} changes buffers as it runs", None
    why = _dtype_mismatch(model, options.get("dtype"))
    if why is None:
        why = _class_or_config_mismatch(model, folder, head)
    if why is None:
        why = _files_mismatch(model, Path(folder))
    if why is not None:
        return why, None
    from .loading import load_tokenizer

    try:
        return None, load_tokenizer(folder)
    except (OSError, ValueError) as exc:
        return f"its tokenizer does not load ({exc})", None


def _dtype_mismatch(model: Any, dtype: Any) -> str | None:
    if not isinstance(dtype, str) or dtype == "auto":
        return f"the load dtype {dtype!r} is not a fixed dtype"
    wanted = f"torch.{dtype}"
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point() and str(tensor.dtype) != wanted:
            return f"parameter {name} is {tensor.dtype}, and the folder loads in {dtype}"
    for name, tensor in model.named_buffers():
        if tensor.is_floating_point() and str(tensor.dtype) != "torch.float32":
            return f"buffer {name} is {tensor.dtype} (a load computes it afresh)"
    return None


def _class_or_config_mismatch(model: Any, folder: str, head: str) -> str | None:
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    try:
        chosen = getattr(transformers, HEADS[head])._model_mapping[type(config)]
    except (KeyError, ValueError):
        return f"{HEADS[head]} has no class for {type(config).__name__}"
    if chosen is not type(model):
        return f"loading it gives {getattr(chosen, '__name__', chosen)}, not {type(model).__name__}"
    if config_hash(config) != config_hash(model.config):
        return "its saved config.json differs from the live config"
    return None


def _files_mismatch(model: Any, folder: Path) -> str | None:
    """Whether the folder's weights are exactly the live tensors (tied ones tied back by the load)."""
    import torch
    from safetensors import safe_open

    # a Trainer checkpoint also holds optimizer.pt, scheduler.pt, rng_state.pth and training_args.bin: not weights
    if any(folder.glob("pytorch_model*.bin")):
        return "it holds pytorch_model*.bin weights"
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        return "it holds no model*.safetensors"
    live = model.state_dict()
    seen: dict[str, Any] = {}
    for file in files:
        with safe_open(os.fspath(file), framework="pt") as handle:
            for name in handle.keys():
                tensor = live.get(name)
                saved = handle.get_tensor(name)
                if tensor is None:
                    return f"{file.name} holds {name}, which the live model has not"
                if (
                    tensor.dtype != saved.dtype
                    or tensor.shape != saved.shape
                    or not torch.equal(tensor.detach().cpu(), saved)
                ):
                    return f"{name} in {file.name} differs from the live tensor"
                seen[name] = tensor
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for name, tensor in live.items():
        if name in seen:
            if name in tied and tied[name] in seen and seen[tied[name]].data_ptr() != tensor.data_ptr():
                return f"the tied weight {name} is saved untied (a load may tie it to {tied[name]})"
            continue
        source = seen.get(tied.get(name, ""))
        if source is None or source.data_ptr() != tensor.data_ptr():
            return f"{name} is not saved in the folder"
    return None
