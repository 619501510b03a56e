"""The commands that run a model: serve, chat-server, cache-activations, generate-vectors, analyze-probe, info.

Inputs (data file, fields, layers) are checked before any model loads, so a typo never costs a model load.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from ..errors import ConfigError, HFCacheHooksError
from .manage import human_bytes
from .words import says_flags

STORAGE_DTYPES = ("float16", "bfloat16", "float32")  # activations.store.DTYPES, without importing numpy here
MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..generation.backends import TransformersBackend
    from ..generation.server import create_app

    model, tokenizer = _load(args)
    backend = TransformersBackend(
        model,
        tokenizer,
        batch_size=args.batch_size,
        use_chat_template=args.chat_template,
        system_prompt=args.system_prompt,
    )
    app = create_app(backend, args.name or args.model, max_model_len=args.max_model_len)
    print(
        f"Serving {args.model} as {args.name or args.model!r} at http://{args.host}:{args.port}/v1 "
        "(completions, chat/completions, models; Ctrl-C to stop)"
    )
    # SIGTERM / Ctrl-C: streams still running after 5 s are cut (each stops at its next token), then the process exits
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def cmd_chat_server(args: argparse.Namespace) -> int:
    import uvicorn

    from ..conversation.app import create_app
    from ..conversation.bodies import Limits
    from ..conversation.cache import TokenCache
    from ..conversation.files import TokenCacheConfig

    config = TokenCacheConfig()
    if args.config:
        import yaml

        try:
            config = TokenCacheConfig.from_yaml_dict(yaml.safe_load(Path(args.config).read_text()) or {})
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"Cannot read the cache settings {args.config}: {exc}") from exc
    # --directory, else the YAML's disk.directory, else <--cache-dir root>/conversations (never the default root)
    directory = args.directory or config.resolved_cache.folder or args.root / "conversations"
    config = dataclasses.replace(config, cache=dataclasses.replace(config.resolved_cache, folder=directory))
    limits = Limits(
        max_new_tokens=args.max_new_tokens,
        max_new_tokens_cap=args.max_new_tokens_cap,
        max_message_tokens=args.max_message_tokens,
    )
    began = time.perf_counter()
    print(f"Loading {args.model} (weights, then the tokenizer)...", flush=True)
    model, tokenizer = _load(args)
    print(f"Model loaded in {time.perf_counter() - began:.1f} s; opening the token cache...", flush=True)
    cache = TokenCache(config, model=model, tokenizer=tokenizer)  # serves only what this model wrote
    pending, rows = len(cache.pending_lens()), cache.conversations()
    others = sum(cache.refusal(row["conv_id"]) is not None for row in rows)
    print(
        f"Token cache {cache.root}: {len(rows)} conversations"
        + (f", {pending} turns queued for their lens" if pending else "")
        + (
            f"; {others} written by another model or an older version are not served (start new conversation "
            "ids, or serve them with the model that wrote them)"
            if others
            else ""
        ),
        flush=True,
    )
    hosts = list(args.allow_host) + ([args.host] if args.host not in ("0.0.0.0", "::", "") else [])
    app = create_app(model, tokenizer, cache, k=args.top_k, keep_kv=args.keep_kv, limits=limits, allow_hosts=hosts)
    print(
        f"Chat page for {args.model} at http://{args.host}:{args.port}/ (API under /api; ready after "
        f"{time.perf_counter() - began:.1f} s)",
        flush=True,
    )
    # SIGTERM / Ctrl-C: a reply still running after 5 s stops at its next token (not stored), then the process exits
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def _check_model(args: argparse.Namespace) -> None:
    """A --model that is written as a path must be a folder (anything else is read as a Hub name)."""
    looks_like_path = args.model.startswith(("/", "./", "../", "~")) or Path(args.model).suffix in (".gguf",)
    if looks_like_path and not Path(args.model).expanduser().is_dir():
        raise ConfigError(
            f"--model {args.model}: no such folder. Give a model folder (with --gguf-file FILE for a "
            "GGUF model) or a Hub name such as HuggingFaceTB/SmolLM2-135M-Instruct."
        )


def _load(args: argparse.Namespace) -> tuple:
    """Model and tokenizer for the commands that need one (weights are loaded only here)."""
    from .._models.inference import load_planned, plan_load

    _check_model(args)  # the load plan: this rank's GPU when there is one, attention ladder there; CPU unchanged
    model, tokenizer, _ = load_planned(
        args.model,
        plan_load(dtype=args.model_dtype),
        head="base" if args.encoder else "causal",
        gguf_file=args.gguf_file,
    )
    return model, tokenizer


def _check_layers_fit(args: argparse.Namespace, layers: list[int]) -> None:
    """Refuse layers outside 0..n from the model's config alone, before its weights load."""
    from .._models.architecture import configured_layers
    from .._models.loading import load_config

    _check_model(args)
    n = configured_layers(load_config(args.model, gguf_file=args.gguf_file))
    bad = [layer for layer in layers if n is not None and not 0 <= layer <= n]
    if bad:
        raise ConfigError(
            f"--layers {','.join(map(str, bad))} not in 0..{n} for {args.model} ({n} blocks: "
            f"0 = embeddings, {n} = last block). Pick layers in that range."
        )


def _check_inputs(
    args: argparse.Namespace, layers: list[int] | None, need_labels: bool, fit: bool = True
) -> list[dict]:
    """Check the data file, its fields and the layers before any model loads (a typo costs no model load).

    Returns the records, so the file is read once. With `fit=False` the layers are not checked against the
    model's config (the caller does it on a miss).
    """
    from ..activations.spec import load_records

    if not layers:
        raise ConfigError("--layers is empty: give comma-separated layer numbers, e.g. 10,20,30.")
    path = Path(args.data)
    if not path.is_file():
        raise ConfigError(f"--data {args.data}: no such file. Give a JSON or JSONL file of records.")
    try:
        rows = load_records(path, args.text_field, args.label_field or "label")
    except HFCacheHooksError:
        raise
    except ValueError as exc:  # orjson.JSONDecodeError
        raise ConfigError(
            f"--data {args.data} is not valid JSON/JSONL ({exc}). Give a JSON list of records, "
            "or one JSON record per line in a .jsonl file."
        ) from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(
            f"--data {args.data} holds no records. Give a JSON list of objects with a {args.text_field!r} field."
        )
    missing = [i for i, r in enumerate(rows) if args.text_field not in r]
    if missing:
        raise ConfigError(
            f"--data {args.data}: record {missing[0]} (and {len(missing) - 1} more) has no "
            f"{args.text_field!r} field. Fix the file, or set --text-field."
        )
    labels = [args.label_field] if args.label_field else ["type", "label"]
    if (args.label_field or need_labels) and not any(all(f in r for r in rows) for f in labels):
        raise ConfigError(
            f"--data {args.data}: not every record has a {' or '.join(map(repr, labels))} field. "
            "Fix the file, or set --label-field."
        )
    if fit:
        _check_layers_fit(args, layers)
    return rows


def _layers(text: str | None) -> list[int] | None:
    try:
        layers = [int(x) for x in text.replace(" ", "").split(",") if x] if text else None
    except ValueError:
        raise ConfigError(f"--layers {text!r} must be comma-separated integers, e.g. 10,20,30.") from None
    if layers and min(layers) < 0:
        raise ConfigError(f"--layers {text!r}: layers count from 0 (the embeddings); use non-negative numbers.")
    return layers


def _store(args: argparse.Namespace, layers: list[int] | None):
    """The cache from --cache, or (the traditional path) one filled from --model on the way."""
    from ..activations.store import ActivationStore
    from ..activations.writer import cache_activations

    if args.cache:
        return ActivationStore(args.cache)
    if not (args.model and args.data and layers):
        raise ConfigError("Give --cache DIR, or --model M --data D.json --layers L1,L2 (fills a cache).")
    rows = _check_inputs(args, layers, need_labels=True)
    model, tokenizer = _load(args)
    folder = args.root / "activations" / f"{Path(args.model).name}_{Path(args.data).stem}"
    return cache_activations(
        model,
        tokenizer,
        rows,
        folder,
        layers,
        positions=args.positions,
        dtype=args.dtype,
        text_field=args.text_field,
        label_field=args.label_field,
        batch_size=args.batch_size,
        force=True,
    )


@says_flags
def cmd_cache_activations(args: argparse.Namespace) -> int:
    """Open the finished store without loading the model when its files are recognised; else load and extract.

    The data file is read once and the model's files are hashed once, on a hit and on a miss.
    """
    from .._core.cache_config import CacheConfig
    from ..activations.paths import ModelPath, extract_from_path, find_remembered
    from ..activations.spec import ExtractionSpec
    from ..activations.writer import store_settings

    layers = _layers(args.layers) or []
    rows = _check_inputs(args, layers, need_labels=False, fit=False)
    _check_model(args)
    folder, cache = store_settings(args.output, CacheConfig(root=args.root, max_age=args.max_age))
    model = ModelPath(
        args.model, head="base" if args.encoder else "causal", dtype=args.model_dtype, gguf_file=args.gguf_file
    )
    spec = ExtractionSpec(
        tuple(layers),
        positions=args.positions,
        dtype=args.dtype,
        text_field=args.text_field,
        label_field=args.label_field,
        use_chat_template=args.chat_template,
        system_prompt=args.system_prompt,
        max_length=args.max_length,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
    )
    store, state = find_remembered(model, rows, folder, spec, cache)
    if store is None:
        _check_layers_fit(args, layers)  # reads the model's config: only when the weights will load anyway
        store = extract_from_path(model, rows, folder, spec, cache, state, force=args.force)
    info = store.info()
    print(
        f"Cached layers {info['layers']} for {info['num_examples']} examples ({info['dtype']}, "
        f"{human_bytes(info['bytes'])}) in {args.output}"
    )
    return 0


@says_flags
def cmd_generate_vectors(args: argparse.Namespace) -> int:
    from ..activations.probing import generate_vectors

    layers = _layers(args.layers)
    run = generate_vectors(_store(args, layers), args.output, layers, positive=args.positive)
    print(f"Vectors written to {run}/normalized_vectors (and raw_vectors)")
    return 0


@says_flags
def cmd_analyze_probe(args: argparse.Namespace) -> int:
    from ..activations.probing import analyze_probe, find_vectors
    from ..activations.vectors import load_vectors

    layers = _layers(args.layers)
    store = _store(args, layers or sorted(load_vectors(find_vectors(args.vectors))))
    if args.cache and args.data:
        _check_data(store, args)
    rows = analyze_probe(store, args.vectors, args.output, layers, visualize=args.visualize)
    print(f"{'layer':>5}  {'AUROC':>6}  95% interval      n  (positive: {rows[0]['positive']})")
    for row in rows:
        print(
            f"{row['layer']:>5}  {row['auroc']:>6.3f}  [{row['auroc_low']:.3f}, {row['auroc_high']:.3f}]  {row['n']:>5}"
        )
    print(
        f"Per-example scores: {args.output}/probe_stats_layer{{L}}.csv"
        + ("; plots: auroc_by_layer.png, scores_layer{L}.png" if args.visualize else "")
    )
    return 0


def _check_data(store, args: argparse.Namespace) -> None:
    from .._core.fingerprint import fingerprint_data
    from ..activations.spec import load_records

    expected = store.key_inputs["data"]["fingerprint"]
    if fingerprint_data(load_records(args.data, args.text_field, args.label_field or "label")) != expected:
        raise ConfigError(
            f"{args.cache} was not built from {args.data} (data fingerprints differ). "
            "Cache that file first, or drop --data."
        )


@says_flags
def cmd_info(args: argparse.Namespace) -> int:
    from ..activations.store import ActivationStore

    store = ActivationStore(args.folder)
    info = store.info()
    key = store.key_inputs
    lines = [
        str(args.folder),
        f"  layers      {', '.join(map(str, info['layers']))}",
        f"  examples    {info['num_examples']} ({info['rows']} rows, positions={info['positions']})",
        f"  dtype       {info['dtype']} × {info['hidden_size']}",
        f"  size        {human_bytes(info['bytes'])} in {info['chunks']} shard(s)",
        f"  model       {info['model']} (weights {key['model'].get('weights', '')[:12]}, {key['model'].get('dtype')})",
        f"  data        {key['data']['fingerprint'][:24]} ({key['data']['n']} records, "
        f"text={key['data']['text_field']})",
        f"  template    {key['template']}",
        f"  key         {info['key']}   created {info['created']}",
    ]
    print("\n".join(lines))
    return 0
