"""Identity of a model, its tokenizer and its effective generation settings, as key inputs.

Model identity: name, resolved revision (from the Hub cache, no network), a hash of the parameters
themselves (so an in-memory fine-tune is a new model), dtype, quantisation, architecture config, PEFT
adapter config and the mode it runs in (always eval: see `runners.eval_mode`). Tokenizer identity:
vocabulary, full backend state, special tokens, chat template, and the truncation and padding settings
that decide what a batch holds.

For a model given as a path or Hub name, the identity is remembered against the state of the files
transformers will load, found as transformers finds them (`sources.resolve_files`): the folder, or the
Hub-cache snapshot of the revision asked for; `load_kwargs["subfolder"]`; the GGUF file wherever it lies;
an adapter folder's base model. Each content hash is remembered by its stat stamp. A source that cannot be
resolved without the network has no state: nothing is remembered and the model is loaded on every run.
A later run knows the key without loading weights. Each memo is an entry of the contract (`entry.py`)
whose key digest is the files state, checked on read, so a memo swapped or copied under another name is
never used:

    <cache root>/identity/
    ├── CACHEDIR.TAG
    ├── file_hashes.json   entry "file-hashes": content hash per file stamp (see `fingerprint`)
    └── <state>.json       entry "identity": key {"kind": "identity", "digest": <state>,
                           "inputs": {"source", "files", "load"}}, and "identity": {model, tokenizer,
                           generation_defaults} as `model_identity`/`tokenizer_identity` compute them
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import xxhash

from .._core import entry
from .._core.keys import canonical, dumps, hash_bytes, remember
from .._core.store import tag_folder
from ..errors import ConfigError
from .sources import resolve_files, split_hub_path

log = logging.getLogger(__name__)

# Generation settings that never change the generated text; every other setting is in the key. Each is
# proven by tests/test_identity.py::test_settings_left_out_of_the_key_never_change_the_text: the output
# flags only add to what `generate` returns, `pad_token_id` is overridden by the runner with the
# tokenizer's pad id (the tokenizer is in the key), the last two are bookkeeping.
_NOT_OUTPUT = {
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
    "pad_token_id",
    "transformers_version",
    "_from_model_config",
}
# `cache_implementation` values that hold the same keys and values (`compile_decode` sets "static"); any
# other (quantized, offloaded, ...) is in the key.
_SAME_KV_CACHE = {"dynamic", "static"}
# Settings whose output is not a function of the key: refused, with the fix (see `effective_generation`).
_NOT_CACHEABLE = {"max_time": "it stops generation by the clock, so the text depends on the machine and its load"}
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
    "use_cache": True,
}
_IDENTITY_FIELDS = ("model", "tokenizer", "generation_defaults")
# Bumped when what an identity holds changes, so a memo written by an older version is never read as current.
_IDENTITY_VERSION = 2
_states: dict[tuple, str] = {}  # (source, files hash, settings JSON) -> files state, as computed in this process
_state_inputs: dict[str, dict] = {}  # files state -> what it was computed from (the memo's key inputs)


WHERE_FROM = ("name", "revision")  # where a model came from, not what it computes: shown, never keyed


def computed(model: Mapping[str, Any]) -> dict:
    """A model identity less where the model came from (`WHERE_FROM`): what decides its outputs (weights,
    config, class, dtype, quantisation, adapters, mode). The same weights evaluated as an object, by the
    path they were saved to, or from another revision with the same files share one key.

    Example:
        >>> computed({"name": "org/tiny", "revision": None, "weights": "ab"})
        {'weights': 'ab'}
    """
    return {k: v for k, v in model.items() if k not in WHERE_FROM}


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


def config_hash(config: Any) -> str:
    """A hash of the architecture config, less where it was loaded from and its dtype (both keyed apart)."""
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
        "config": config_hash(config),
        "weights": params_fingerprint(model),
        "dtype": str(getattr(model, "dtype", "")).replace("torch.", ""),
        "quantization": orjson.loads(orjson.dumps(quant, default=str)) if quant else None,
        "adapter": adapter,
        "mode": "eval",  # every run of this library is in eval mode (`runners.eval_mode`), whatever mode it came in
    }


def tokenizer_identity(tokenizer: Any) -> dict | None:
    """Key inputs for a tokenizer: vocabulary, backend state, special tokens, chat template, and the
    settings that decide what a batch holds: `model_max_length` and `truncation_side` (where a classifier's
    input is cut) and `padding_side` (where a classifier's batch is padded).

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
        "model_max_length": _plain_int(getattr(tokenizer, "model_max_length", None)),
        "truncation_side": str(getattr(tokenizer, "truncation_side", None)),
        "padding_side": str(getattr(tokenizer, "padding_side", None)),
    }


def _plain_int(value: Any) -> int | str | None:
    """An int as JSON holds it; transformers' "no limit" (int(1e30)) and other huge values as their digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if abs(value) < 2**63 else str(value)
    return None if value is None else str(value)


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

    Raises:
        ConfigError: a setting whose output is not a function of the key (`max_time`) is set.
    """
    merged = dict(defaults)
    merged.update({k: v for k, v in overrides.items()})
    for name, why in _NOT_CACHEABLE.items():
        if merged.get(name) is not None:
            where = "your generation settings" if overrides.get(name) is not None else "the model's generation_config"
            raise ConfigError(
                f"{name}={merged[name]!r} (from {where}) cannot be cached: {why}. Bound the length with "
                f"max_new_tokens instead (set {name}=None in generation_kwargs to drop the model's default), or "
                "run uncached with use_prediction_cache=False."
            )
    if merged.get("cache_implementation") in _SAME_KV_CACHE:
        merged.pop("cache_implementation")
    for name, default in _GLOBAL_DEFAULTS.items():
        if merged.get(name) is None:
            merged[name] = default
    if merged.get("max_new_tokens") is not None:
        merged.pop("max_length", None)
    if not merged.get("do_sample"):
        for name in _SAMPLING_ONLY:
            merged.pop(name, None)
    return canonical({k: v for k, v in merged.items() if k not in _NOT_OUTPUT and v is not None})


def files_state(name_or_path: str, load_options: Mapping[str, Any], root: Path) -> str | None:
    """A hash of the files transformers loads (`resolve_files`) and how they are loaded; None when they
    cannot be found without the network, so nothing is remembered and the model is loaded on every run.

    Raises:
        ConfigError: `gguf_file` is not there in a local model folder.
    """
    groups = resolve_files(name_or_path, load_options)
    if groups is None:
        return None
    from .._core.fingerprint import hash_files

    memo = root / "identity" / "file_hashes.json"
    content = {name: hash_files(files, memo_path=memo, base=base) for name, (base, files) in groups.items()}
    try:
        seen: tuple | None = (
            name_or_path,
            tuple(sorted(content.items())),
            orjson.dumps(load_options, option=orjson.OPT_SORT_KEYS),
        )
    except TypeError:  # a setting that is not plain JSON: spelled canonically every time
        seen = None
    state = _states.get(seen) if seen is not None else None
    if state is None:  # the canonical spelling once per files state and settings, not on every hit
        inputs = {"source": name_or_path, "files": content, "load": canonical(dict(load_options))}
        state = hash_bytes(dumps({"files": content, "load": dict(load_options), "version": _IDENTITY_VERSION}))
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
