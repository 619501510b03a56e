"""`hf-cachehooks`: the management command line. It prints; the library only logs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import management
from .errors import HFCacheHooksError
from .freshness import describe_age, parse_duration
from .store import cache_root


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _print_plan(plan: management.Plan, dry_run: bool, verb: str) -> None:
    for path in plan.paths:
        print(f"  {path}")
    if dry_run:
        print(f"Would {verb} {len(plan.paths)} item(s), freeing {_bytes(plan.size)}. (dry run: nothing deleted)")
    else:
        plan.execute()
        print(f"{verb.capitalize()}d {len(plan.paths)} item(s), freed {_bytes(plan.size)}.")


def cmd_ls(args: argparse.Namespace) -> int:
    infos = management.list_entries(args.root, args.kind)
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
        print(f"{_bytes(size):>10}  {kind}")
    print(f"{_bytes(sum(usage.values())):>10}  total ({args.root})")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    plan = management.plan_prune(args.root, parse_duration(args.older_than), kind=args.kind)
    _print_plan(plan, args.dry_run, "remove")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    plan = management.plan_clear(args.root, args.kind)
    _print_plan(plan, args.dry_run, "remove")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
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
    from .backends import TransformersBackend
    from .config import EvalConfig
    from .runners import load_model
    from .server import make_server

    loaded = load_model(args.model, EvalConfig(gguf_file=args.gguf_file, model_dtype=args.dtype))
    backend = TransformersBackend(loaded.model, loaded.tokenizer, use_chat_template=args.chat_template)
    server = make_server(backend, args.name or args.model, host="127.0.0.1", port=args.port)
    print(f"Serving {args.model} at http://127.0.0.1:{server.server_address[1]}/v1/completions (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-cachehooks", description="Inspect and manage hf_cachehooks caches.")
    parser.add_argument("--cache-dir", help="cache root (default: $HF_CACHEHOOKS_HOME, else outputs/cache)")
    sub = parser.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("ls", help="list entries: kind, model, size, age, key")
    ls.add_argument("--kind")
    ls.add_argument("--format", choices=("table", "json"), default="table")
    ls.set_defaults(run=cmd_ls)

    sub.add_parser("du", help="bytes used per kind").set_defaults(run=cmd_du)

    prune = sub.add_parser("prune", help="remove entries older than a duration")
    prune.add_argument("--older-than", required=True, help="e.g. 7d, 12h, 2w")
    prune.add_argument("--kind")
    prune.add_argument("--dry-run", action="store_true")
    prune.set_defaults(run=cmd_prune)

    clear = sub.add_parser("clear", help="remove every entry (of one kind)")
    clear.add_argument("--kind")
    clear.add_argument("--dry-run", action="store_true")
    clear.set_defaults(run=cmd_clear)

    ver = sub.add_parser("verify", help="check every entry's checksum (exit 1 if any is corrupt)")
    ver.add_argument("--kind")
    ver.set_defaults(run=cmd_verify)

    exp = sub.add_parser("explain", help="which key fields differ between two entries, or why the last lookup missed")
    exp.add_argument("a", nargs="?", help="entry file or key prefix")
    exp.add_argument("b", nargs="?", help="entry file or key prefix")
    exp.set_defaults(run=cmd_explain)

    serve = sub.add_parser("serve", help="a small OpenAI-compatible completion server on loopback (tests, laptops)")
    serve.add_argument("--model", required=True, help="model folder or Hub name")
    serve.add_argument("--gguf-file")
    serve.add_argument("--dtype", default="float32")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--name", help="model name the server answers to (default: --model)")
    serve.add_argument("--chat-template", action="store_true", help="wrap each prompt in the chat template")
    serve.set_defaults(run=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.root = Path(cache_root(args.cache_dir))
    try:
        return args.run(args)
    except HFCacheHooksError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
