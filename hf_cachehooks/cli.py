"""`hf-cachehooks`: the management command line. It prints; the library only logs."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

from . import management
from ._core.freshness import describe_age, parse_duration
from ._core.store import cache_root
from .errors import ConfigError, HFCacheHooksError


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _print_plan(plan: management.Plan, dry_run: bool, verb: str) -> None:
    for path in plan.entries:
        print(f"  {path}")
    for path in plan.leftovers:
        print(f"  {path}  (left by a dead writer)")
    if dry_run:
        print(f"Would {verb} {len(plan.paths)} item(s), freeing {_bytes(plan.size)}. (dry run: nothing deleted)")
    else:
        plan.execute()
        print(f"{verb.capitalize()}d {len(plan.paths)} item(s), freed {_bytes(plan.size)}.")


def _confirmed(plan: management.Plan, args: argparse.Namespace) -> bool:
    """`clear` deletes only after --yes, or a "y" typed at a terminal."""
    if args.dry_run or args.yes or not plan.paths:
        return True
    question = f"Delete {len(plan.paths)} item(s) ({_bytes(plan.size)}) under {args.root}? [y/N] "
    if not sys.stdin.isatty():
        print(f"error: clear would delete {len(plan.paths)} item(s) ({_bytes(plan.size)}) under {args.root}; "
              "pass --yes to confirm, or --dry-run to list them.", file=sys.stderr)
        return False
    return input(question).strip().lower() in ("y", "yes")


def cmd_ls(args: argparse.Namespace) -> int:
    infos = management.list_entries(args.root, args.kind, bookkeeping=args.all or args.kind is not None)
    if args.format == "json":
        print(management.to_json(infos).decode())
        return 0
    now = time.time()
    print(f"{'KIND':<22} {'MODEL':<36} {'EXAMPLES':>8} {'SIZE':>9} {'AGE':>5}  KEY")
    for e in infos:
        model = e.model if len(e.model) <= 36 else "…" + e.model[-35:]
        print(f"{e.kind:<22} {model:<36} {e.examples or '-':>8} {_bytes(e.size):>9} "
              f"{describe_age(now - e.created_at):>5}  {e.key}")
    print(f"{len(infos)} entries under {args.root}")
    return 0


def cmd_du(args: argparse.Namespace) -> int:
    usage = management.disk_usage(args.root)
    for kind, size in usage.items():
        print(f"{_bytes(size):>10}  {kind}")  # entries of each kind: manifests plus the files they list
    print(f"{_bytes(sum(usage.values())):>10}  total ({args.root})")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    plan = management.plan_prune(args.root, parse_duration(args.older_than), kind=args.kind)
    _print_plan(plan, args.dry_run, "remove")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    plan = management.plan_clear(args.root, args.kind)
    if not _confirmed(plan, args):
        print("Nothing deleted.")
        return 1
    _print_plan(plan, args.dry_run, "remove")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.path:
        from .activations.store import verify_store

        problems_found = verify_store(args.path)
        for line in problems_found:
            print(f"CORRUPT {line}")
        print(f"{args.path}: {'OK' if not problems_found else f'{len(problems_found)} problem(s)'}")
        return 1 if problems_found else 0
    checked, problems = management.verify(args.root, args.kind)
    for path, problem in problems:
        print(f"CORRUPT {path}: {problem}")
    print(f"{checked} entries checked, {len(problems)} corrupt.")
    return 1 if problems else 0


def cmd_explain(args: argparse.Namespace) -> int:
    for line in management.explain(args.root, args.a, args.b):
        print(line)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .generation.backends import TransformersBackend
    from .generation.server import make_server

    model, tokenizer = _load(args)
    backend = TransformersBackend(model, tokenizer, use_chat_template=args.chat_template)
    server = make_server(backend, args.name or args.model, host="127.0.0.1", port=args.port)
    print(f"Serving {args.model} at http://127.0.0.1:{server.server_address[1]}/v1/completions (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_chat_server(args: argparse.Namespace) -> int:
    import uvicorn

    from .conversation.app import create_app
    from .conversation.cache import TokenCache
    from .conversation.files import TokenCacheConfig

    config = TokenCacheConfig()
    if args.config:
        import yaml

        try:
            config = TokenCacheConfig.from_yaml_dict(yaml.safe_load(Path(args.config).read_text()) or {})
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"Cannot read the cache settings {args.config}: {exc}") from exc
    if args.directory:
        config = dataclasses.replace(config, directory=args.directory)
    model, tokenizer = _load(args)
    cache = TokenCache(config)
    print(f"Chat page for {args.model} at http://{args.host}:{args.port}/ (API under /api; cache: {cache.root})")
    uvicorn.run(create_app(model, tokenizer, cache, k=args.top_k, max_new_tokens=args.max_new_tokens,
                           keep_kv=args.keep_kv), host=args.host, port=args.port, log_level="warning")
    return 0


def _load(args: argparse.Namespace) -> tuple:
    """Model and tokenizer for the commands that need one (weights are loaded only here)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    auto = AutoModel if args.encoder else AutoModelForCausalLM
    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = auto.from_pretrained(args.model, dtype=getattr(torch, args.model_dtype), **extra).eval()
    return model, AutoTokenizer.from_pretrained(args.model, **extra)


def _layers(text: str | None) -> list[int] | None:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x] if text else None
    except ValueError:
        raise HFCacheHooksError(f"--layers {text!r} must be comma-separated integers, e.g. 10,20,30.") from None


def _store(args: argparse.Namespace, layers: list[int] | None):
    """The cache from --cache, or (the traditional path) one filled from --model on the way."""
    from .activations.store import ActivationStore
    from .activations.writer import cache_activations

    if args.cache:
        return ActivationStore(args.cache)
    if not (args.model and args.data and layers):
        raise HFCacheHooksError("Give --cache DIR, or --model M --data D.json --layers L1,L2 (fills a cache).")
    model, tokenizer = _load(args)
    folder = args.root / "activations" / f"{Path(args.model).name}_{Path(args.data).stem}"
    return cache_activations(model, tokenizer, args.data, folder, layers, positions=args.positions,
                             dtype=args.dtype, text_field=args.text_field, label_field=args.label_field,
                             batch_size=args.batch_size, force=True)


def cmd_cache_activations(args: argparse.Namespace) -> int:
    from .activations.writer import cache_activations

    model, tokenizer = _load(args)
    store = cache_activations(model, tokenizer, args.data, args.output, _layers(args.layers) or [],
                              positions=args.positions, dtype=args.dtype, text_field=args.text_field,
                              label_field=args.label_field, use_chat_template=args.chat_template,
                              system_prompt=args.system_prompt, max_length=args.max_length,
                              batch_size=args.batch_size, shard_size=args.shard_size, force=args.force,
                              max_age_days=args.max_age_days)
    info = store.info()
    print(f"Cached layers {info['layers']} for {info['num_examples']} examples ({info['dtype']}, "
          f"{_bytes(info['bytes'])}) in {args.output}")
    return 0


def cmd_generate_vectors(args: argparse.Namespace) -> int:
    from .activations.probing import generate_vectors

    layers = _layers(args.layers)
    run = generate_vectors(_store(args, layers), args.output, layers, positive=args.positive)
    print(f"Vectors written to {run}/normalized_vectors (and raw_vectors)")
    return 0


def cmd_analyze_probe(args: argparse.Namespace) -> int:
    from .activations.probing import analyze_probe
    from .activations.vectors import load_vectors

    layers = _layers(args.layers)
    store = _store(args, layers or sorted(load_vectors(args.vectors)))
    if args.cache and args.data:
        _check_data(store, args)
    rows = analyze_probe(store, args.vectors, args.output, layers, visualize=args.visualize)
    print(f"{'layer':>5}  {'AUROC':>6}  95% interval      n  (positive: {rows[0]['positive']})")
    for row in rows:
        print(f"{row['layer']:>5}  {row['auroc']:>6.3f}  [{row['auroc_low']:.3f}, {row['auroc_high']:.3f}]  "
              f"{row['n']:>5}")
    print(f"Per-example scores: {args.output}/probe_stats_layer{{L}}.csv" +
          ("; plots: auroc_by_layer.png, scores_layer{L}.png" if args.visualize else ""))
    return 0


def _check_data(store, args: argparse.Namespace) -> None:
    from ._core.fingerprint import fingerprint_data
    from .activations.writer import load_records

    expected = store.key_inputs["data"]["fingerprint"]
    if fingerprint_data(load_records(args.data, args.text_field, args.label_field or "label")) != expected:
        raise HFCacheHooksError(f"{args.cache} was not built from {args.data} (data fingerprints differ). "
                                "Cache that file first, or drop --data.")


def cmd_info(args: argparse.Namespace) -> int:
    from .activations.store import ActivationStore

    store = ActivationStore(args.folder)
    info = store.info()
    key = store.key_inputs
    lines = [
        str(args.folder),
        f"  layers      {', '.join(map(str, info['layers']))}",
        f"  examples    {info['num_examples']} ({info['rows']} rows, positions={info['positions']})",
        f"  dtype       {info['dtype']} × {info['hidden_size']}",
        f"  size        {_bytes(info['bytes'])} in {info['chunks']} shard(s)",
        f"  model       {info['model']} (weights {key['model'].get('weights', '')[:12]}, {key['model'].get('dtype')})",
        f"  data        {key['data']['fingerprint'][:24]} ({key['data']['n']} records, "
        f"text={key['data']['text_field']})",
        f"  template    {key['template']}",
        f"  key         {info['key']}   created {info['created']}",
    ]
    print("\n".join(lines))
    return 0


def _model_args(p: argparse.ArgumentParser, required: bool, dtype_flag: str = "--model-dtype",
                encoder: bool = True) -> None:
    """The flags `_load` reads: --model, --gguf-file, the load dtype and (for extraction) --encoder."""
    p.add_argument("--model", required=required, help="model folder or Hub name")
    p.add_argument("--gguf-file")
    p.add_argument(dtype_flag, dest="model_dtype", default="float32", help="dtype to load the model in")
    if encoder:
        p.add_argument("--encoder", action="store_true", help="load with AutoModel (encoders such as MiniLM)")
    else:
        p.set_defaults(encoder=False)  # generation needs a causal LM


def _activation_args(p: argparse.ArgumentParser, model_required: bool) -> None:
    _model_args(p, model_required)
    p.add_argument("--positions", choices=("last", "first", "mean", "all"), default="last")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="storage dtype of the activations")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default=None, help="default: 'type' when present, else 'label'")
    p.add_argument("--batch-size", type=int, default=8)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-cachehooks", description="Inspect and manage hf_cachehooks caches.")
    parser.add_argument("--cache-dir", help="cache root (default: $HF_CACHEHOOKS_HOME, else outputs/cache)")
    sub = parser.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("ls", help="list entries: kind, model, size, age, key")
    ls.add_argument("--kind", help="an entry kind (predictions, generations, activations, conversation, ...) "
                    "or a top folder (experiments, conversations, ...)")
    ls.add_argument("--all", action="store_true", help="also list memos (identity, file-hashes, last-miss)")
    ls.add_argument("--format", choices=("table", "json"), default="table")
    ls.set_defaults(run=cmd_ls)

    sub.add_parser("du", help="bytes used per entry kind").set_defaults(run=cmd_du)

    prune = sub.add_parser("prune", help="remove entries older than a duration (conversations: idle that long; "
                           "pinned ones stay)")
    prune.add_argument("--older-than", required=True, help="e.g. 7d, 12h, 2w")
    prune.add_argument("--kind", help="only entries of this kind or top folder")
    prune.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")
    prune.set_defaults(run=cmd_prune)

    clear = sub.add_parser("clear", help="remove every entry (of one kind); asks first, or needs --yes")
    clear.add_argument("--kind", help="only entries of this kind or top folder")
    clear.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")
    clear.add_argument("--yes", action="store_true", help="delete without asking (scripts, no terminal)")
    clear.set_defaults(run=cmd_clear)

    ver = sub.add_parser("verify", help="hash every file of every entry against its manifest (exit 1 if any "
                         "is corrupt)")
    ver.add_argument("path", nargs="?", help="an activation cache folder (default: the whole cache root)")
    ver.add_argument("--kind")
    ver.set_defaults(run=cmd_verify)

    exp = sub.add_parser("explain", help="which key fields differ between two entries, or why the last lookup missed")
    exp.add_argument("a", nargs="?", help="entry file or key prefix")
    exp.add_argument("b", nargs="?", help="entry file or key prefix")
    exp.set_defaults(run=cmd_explain)

    serve = sub.add_parser("serve", help="a small OpenAI-compatible completion server on loopback (tests, laptops)")
    _model_args(serve, required=True, dtype_flag="--dtype", encoder=False)
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--name", help="model name the server answers to (default: --model)")
    serve.add_argument("--chat-template", action="store_true", help="wrap each prompt in the chat template")
    serve.set_defaults(run=cmd_serve)

    cache = sub.add_parser("cache-activations", help="extract hidden states at some layers into an Arrow cache")
    _activation_args(cache, model_required=True)
    cache.add_argument("--data", required=True, help="JSON/JSONL records (text + label) or contrastive pairs")
    cache.add_argument("--layers", required=True, help="comma-separated, e.g. 10,20,30")
    cache.add_argument("--output", required=True)
    cache.add_argument("--shard-size", type=int, default=1024, help="examples per shard (resume granularity)")
    cache.add_argument("--chat-template", action="store_true")
    cache.add_argument("--system-prompt")
    cache.add_argument("--max-length", type=int)
    cache.add_argument("--force", action="store_true", help="replace a cache made from other inputs")
    cache.add_argument("--max-age-days", type=float, default=None,
                       help="re-extract a store older than this (default: never expires)")
    cache.set_defaults(run=cmd_cache_activations)

    vec = sub.add_parser("generate-vectors", help="difference-of-means vectors per layer from a cache")
    _activation_args(vec, model_required=False)
    vec.add_argument("--cache", help="activation cache folder (or --model/--data/--layers to fill one)")
    vec.add_argument("--data")
    vec.add_argument("--output", required=True, help="run name; writes RUN_<timestamp>/normalized_vectors/")
    vec.add_argument("--layers")
    vec.add_argument("--positive", help="label of the positive class (default: deployment, if present)")
    vec.set_defaults(run=cmd_generate_vectors)

    ana = sub.add_parser("analyze-probe", help="score a cache with vectors: per-layer AUROC, CSVs, plots")
    _activation_args(ana, model_required=False)
    ana.add_argument("--cache", help="activation cache folder (or --model/--data to fill one)")
    ana.add_argument("--vectors", required=True, help="RUN_<timestamp>/normalized_vectors")
    ana.add_argument("--data", help="the records the cache was made from (checked)")
    ana.add_argument("--output", required=True)
    ana.add_argument("--layers")
    ana.add_argument("--visualize", action="store_true", help="write PNG plots")
    ana.set_defaults(run=cmd_analyze_probe)

    chat = sub.add_parser("chat-server", help="HTTP API over the conversation token cache (logit lens per token)")
    _model_args(chat, required=True, encoder=False)
    chat.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    chat.add_argument("--port", type=int, default=8000)
    chat.add_argument("--directory", help="token cache folder (default: <cache root>/conversations)")
    chat.add_argument("--config", help="YAML file with the cache block (memory, disk, prefetch, ttl); see README")
    chat.add_argument("--keep-kv", type=int, default=2,
                      help="conversations whose model KV cache stays in memory between turns (0: rerun history)")
    chat.add_argument("--top-k", type=int, default=10)
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.set_defaults(run=cmd_chat_server)

    info = sub.add_parser("info", help="layers, examples, dtype, size and key inputs of an activation cache")
    info.add_argument("folder")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.root = Path(cache_root(args.cache_dir))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        return args.run(args)
    except HFCacheHooksError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
