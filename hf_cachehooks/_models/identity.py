"""Identity of a model, its tokenizer and its effective generation settings, as key inputs.

Model identity: name, resolved revision (from the Hub cache, no network), a hash of the parameters
themselves (so an in-memory fine-tune is a new model), dtype, quantisation, architecture config and
PEFT adapter config. Tokenizer identity: vocabulary, full backend state, special tokens, chat template.

For a model given as a path or Hub name, the identity is remembered against the state of its files
(content hashes of the folder, plus `load_kwargs["subfolder"]` when the weights load from there;
each hash remembered by its stat stamp) and how they are loaded, so a later run knows the key
without loading weights. Each memo is an entry of the contract (`entry.py`) whose key digest is
the files state, checked on read, so a memo swapped or copied under another name is never used:

    <cache root>/identity/
    ├── CACHEDIR.TAG
    ├── file_hashes.json   entry "file-hashes": content hash per file stamp (see `fingerprint`)
    └── <state>.json       entry "identity": key {"kind": "identity", "digest": <state>,
                           "inputs": {"source", "files", "load"}}, and "identity": {model, tokenizer,
                           generation_defaults} as `model_identity`/`tokenizer_identity` compute them
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import xxhash

from .._core import entry
from .._core.keys import canonical, dumps, hash_bytes, remember
from .._core.store import tag_folder

log = logging.getLogger(__name__)

# Files in a model folder whose content decides what the model computes.
_MODEL_FILE_SUFFIXES = {".safetensors", ".bin", ".gguf", ".json", ".model", ".txt", ".jinja", ".py", ".tiktoken"}
# Generation settings that never change the generated text.
_NOT_OUTPUT = {
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
    "use_cache",
    "cache_implementation",
    "cache_config",
    "max_cache_len",
    "compile_config",
    "disable_compile",
    "transformers_version",
    "_from_model_config",
    "low_memory",
    "prefill_chunk_size",
    "max_time",
    "continuous_batching_config",
    "return_legacy_cache",
    "pad_token_id",
}
_SAMPLING_ONLY = {"temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"}
# transformers' global defaults: an unset value (None) and its default mean the same generation.
_GLOBAL_DEFAULTS = {
    "do_sample": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "num_return_sequences": 1,
    "max_length": 20,
    "no_repeat_ngram_size": 0,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "early_stopping": False,
}
_IDENTITY_FIELDS = ("model", "tokenizer", "generation_defaults")
_states: dict[tuple, str] = {}  # (source, files hash, settings JSON) -> files state, as computed in this process
_state_inputs: dict[str, dict] = {}  # files state -> what it was computed from (the memo's key inputs)


def split_hub_path(name_or_path: str) -> tuple[str, str | None]:
    """Map `.../models--org--name/snapshots/<sha>[/...]` to ("org/name", sha); other names pass through.

    A Hub repo id is resolved to the commit its `main` ref points at in the local Hub cache.
    """
    parts = Path(name_or_path).parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part[len("models--") :].replace("--", "/"), parts[i + 2]
    if os.path.isdir(name_or_path):
        return Path(name_or_path).resolve().name, None
    ref = hub_cache_dir() / ("models--" + name_or_path.replace("/", "--")) / "refs" / "main"
    try:
        return name_or_path, ref.read_text().strip()
    except OSError:
        return name_or_path, None


def hub_cache_dir() -> Path:
    """The Hub cache, read from the environment now, as huggingface_hub would resolve it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def params_fingerprint(model: Any) -> str:
    """Hash every parameter and buffer (name, dtype, shape, bytes): exact, and ~1 GB/s on CPU."""
    import torch
    import xxhash

    digest = xxhash.xxh3_128()
    with torch.no_grad():
        tensors = list(model.named_parameters()) + list(model.named_buffers())
        for name, tensor in tensors:
            if tensor.device.type == "meta":
                continue
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            flat = tensor.detach().reshape(-1)
            for start in range(0, flat.numel(), 1 << 26):  # 64M elements per copy off the device
                chunk = flat[start : start + (1 << 26)].cpu().contiguous()
                digest.update(chunk.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _config_hash(config: Any) -> str:
    data = config.to_dict()
    for name in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"):
        data.pop(name, None)
    return hash_bytes(orjson.dumps(data, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str))


def model_identity(model: Any) -> dict:
    """Key inputs naming exactly this model object, weights included."""
    config = model.config
    name, revision = split_hub_path(str(getattr(config, "_name_or_path", "") or type(model).__name__))
    quant = getattr(config, "quantization_config", None)
    if quant is not None and not isinstance(quant, Mapping):
        quant = quant.to_dict()
    adapter = None
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        adapter = {
            name: orjson.loads(orjson.dumps(cfg.to_dict(), default=str, option=orjson.OPT_NON_STR_KEYS))
            for name, cfg in sorted(peft_config.items())
        }
    return {
        "name": name,
        "revision": revision,
        "class": type(model).__name__,
        "config": _config_hash(config),
        "weights": params_fingerprint(model),
        "dtype": str(getattr(model, "dtype", "")).replace("torch.", ""),
        "quantization": orjson.loads(orjson.dumps(quant, default=str)) if quant else None,
        "adapter": adapter,
    }


def tokenizer_identity(tokenizer: Any) -> dict | None:
    """Key inputs for a tokenizer: vocabulary, backend state, special tokens and chat template.

    A fast tokenizer is serialised by its backend in one call and that text hashed as it is (about
    20 ms for a 49k vocabulary), minus the run-time padding/truncation settings: `vocab` covers its
    model (vocabulary, merges) and added tokens, `backend` the rest (normalizer, pre-tokenizer, ...).
    A tokenizer without a backend hashes its `get_vocab()`.
    """
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    template = getattr(tokenizer, "chat_template", None)
    if backend is not None:
        vocab, state = _backend_hashes(backend)
    else:
        vocab, state = hash_bytes(_vocab_bytes(tokenizer.get_vocab())), None
    return {
        "class": type(tokenizer).__name__,
        "vocab": vocab,
        "backend": state,
        "special_tokens": canonical({k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()}),
        "chat_template": hash_bytes(dumps(template)) if template else None,
    }


def _vocab_bytes(vocab: Mapping[str, Any]) -> bytes:
    """Sorted (token, id) pairs as JSON; the same bytes `dumps` gives, without walking them in Python."""
    pairs = sorted(vocab.items())
    if all(type(k) is str and type(v) is int for k, v in pairs):
        return orjson.dumps(pairs)
    return dumps(pairs)


_RUNTIME_FIELDS = ("truncation", "padding")  # set at run time by tokenizer(..., padding=True): never a new token
_SMALL_FIELDS = ("normalizer", "pre_tokenizer", "post_processor", "decoder")
_VOCAB_FIELDS = ("added_tokens", "model")


def _backend_hashes(backend: Any) -> tuple[str, str]:
    """(vocab, rest) hashes of the fast tokenizer's serialised state, minus padding/truncation, which
    calls like tokenizer(..., padding=True) change at run time without changing any token (datasets
    #5985, #6179 hit exactly this).

    `to_str()` writes `{"version":…,"truncation":…,"padding":…,"added_tokens":…,"normalizer":…,
    "pre_tokenizer":…,"post_processor":…,"decoder":…,"model":…}`. Every value but the model's (the big
    one) is small and read with an exact JSON decoder to find where it ends; the model's text is hashed
    as it is, never parsed. Any other layout is parsed in full. Every byte of the state but the two
    run-time values goes into one of the two hashes.
    """
    text = backend.to_str()
    try:
        spans = _top_level_spans(text)
    except ValueError:  # another layout: parse it, drop the run-time fields
        state = orjson.loads(text)
        for name in _RUNTIME_FIELDS:
            state.pop(name, None)
        words = {name: state.pop(name, None) for name in _VOCAB_FIELDS}
        options = orjson.OPT_SORT_KEYS
        return "parsed:" + hash_bytes(orjson.dumps(words, option=options)), "parsed:" + hash_bytes(
            orjson.dumps(state, option=options)
        )
    vocab = xxhash.xxh3_128(b"vocab:")
    rest = xxhash.xxh3_128(b"state:")
    for name, (start, end) in spans.items():
        if name not in _RUNTIME_FIELDS:
            target = vocab if name in _VOCAB_FIELDS else rest
            target.update(f"|{name}|".encode())
            target.update(text[start:end].encode())
    return vocab.hexdigest(), rest.hexdigest()


def _top_level_spans(text: str) -> dict[str, tuple[int, int]]:
    """{field: (start, end)} of each top-level value in a backend's `to_str()`; ValueError on another layout."""
    import json

    decoder = json.JSONDecoder()
    names = ("version", *_RUNTIME_FIELDS, "added_tokens", *_SMALL_FIELDS)
    spans = {}
    at = 0
    for i, name in enumerate(names):
        field = ("{" if i == 0 else ",") + f'"{name}":'
        if not text.startswith(field, at):
            raise ValueError(name)
        start = at + len(field)
        _, at = decoder.raw_decode(text, start)
        spans[name] = (start, at)
    if not (text.startswith(',"model":', at) and text.endswith("}")):
        raise ValueError("model")
    spans["model"] = (at + len(',"model":'), len(text) - 1)  # the last value: hashed to the closing brace
    return spans


def generation_defaults(model: Any) -> dict:
    """The model's own generation_config as plain data (the base the user's settings override)."""
    config = getattr(model, "generation_config", None)
    return canonical(orjson.loads(orjson.dumps(config.to_dict(), default=str))) if config is not None else {}


def effective_generation(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """Merge user settings over the model's defaults and drop what cannot change the text.

    Example: greedy decoding ignores temperature, so `temperature` is not in the result when
    `do_sample` is false, and `temperature=0.0` equals `temperature=0`.
    """
    merged = dict(defaults)
    merged.update({k: v for k, v in overrides.items()})
    for name, default in _GLOBAL_DEFAULTS.items():
        if merged.get(name) is None:
            merged[name] = default
    if merged.get("max_new_tokens") is not None:
        merged.pop("max_length", None)
    if not merged.get("do_sample"):
        for name in _SAMPLING_ONLY:
            merged.pop(name, None)
    return canonical({k: v for k, v in merged.items() if k not in _NOT_OUTPUT and v is not None})


def model_files(folder: Path | str, gguf_file: str | None = None, subfolder: str | None = None) -> list[str]:
    """The files in a model folder that decide its output (one GGUF file when `gguf_file` is given), as paths.

    With `subfolder` (transformers' `from_pretrained(..., subfolder=...)`), the files of
    `folder/subfolder` count too: the weights and config load from there, the tokenizer from `folder`.
    """
    top = os.fspath(folder)
    folders = [top, os.path.join(top, subfolder)] if subfolder else [top]
    keep = os.path.basename(gguf_file) if gguf_file else None
    files = []
    for where in folders:
        try:
            with os.scandir(where) as found:  # the file type comes with the listing: no stat per file
                for e in found:
                    suffix = os.path.splitext(e.name)[1]
                    if (
                        not e.name.startswith(".")
                        and suffix in _MODEL_FILE_SUFFIXES
                        and e.is_file()
                        and (keep is None or suffix != ".gguf" or e.name == keep)
                    ):
                        files.append(os.path.join(where, e.name))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return files


def resolve_local_folder(name_or_path: str) -> Path | None:
    """A local folder holding the model: the path itself, or the Hub cache snapshot for `main`."""
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    name, revision = split_hub_path(name_or_path)
    if revision:
        snap = hub_cache_dir() / ("models--" + name.replace("/", "--")) / "snapshots" / revision
        if snap.is_dir():
            return snap
    return None


def files_state(name_or_path: str, load_options: Mapping[str, Any], root: Path) -> str | None:
    """A hash of the model's files and how they are loaded; None when there is no local copy."""
    folder = resolve_local_folder(name_or_path)
    if folder is None:
        return None
    load_kwargs = load_options.get("load_kwargs") or {}
    subfolder = load_kwargs.get("subfolder") if isinstance(load_kwargs, Mapping) else None
    files = model_files(folder, load_options.get("gguf_file"), str(subfolder) if subfolder else None)
    from .._core.fingerprint import hash_files

    content = hash_files(files, memo_path=root / "identity" / "file_hashes.json", base=folder)
    try:
        seen: tuple | None = (name_or_path, content, orjson.dumps(load_options, option=orjson.OPT_SORT_KEYS))
    except TypeError:  # a setting that is not plain JSON: spelled canonically every time
        seen = None
    state = _states.get(seen) if seen is not None else None
    if state is None:  # the canonical spelling once per files state and settings, not on every hit
        inputs = {"source": name_or_path, "files": content, "load": canonical(dict(load_options))}
        state = hash_bytes(dumps({"files": content, "load": dict(load_options)}))
        _state_inputs[state] = inputs
        if seen is not None:
            remember(_states, seen, state, 64)
    return state


def remembered_identity(state: str | None, root: Path) -> dict | None:
    """The identity recorded for this files state by an earlier run, if any (checked to be for `state`)."""
    if not state:
        return None
    # parsed once per change of the memo (shared: the identity is only read, and copied into keys)
    found = entry.open_entry(root / "identity" / f"{state}.json", kind="identity", digest=state, reuse=True)
    identity = found.doc.get("identity") if found is not None else None
    if found is not None and not (
        isinstance(identity, dict)
        and all(
            isinstance(identity.get(name), dict) or (name == "tokenizer" and identity.get(name) is None)
            for name in _IDENTITY_FIELDS
        )
    ):
        log.warning("Identity memo %s has fields of the wrong shape; removing it and loading the model.", found.path)
        entry.remove_entry(found.path)
        return None
    return identity


def remember_identity(state: str | None, identity: dict, root: Path) -> None:
    """Record the identity computed after loading, so the next run can skip the load on a hit."""
    if state:
        folder = root / "identity"
        tag_folder(folder)
        key = {"kind": "identity", "digest": state, "inputs": _state_inputs.get(state, {})}
        entry.commit(folder / f"{state}.json", "identity", key, fields={"identity": identity})
