"""`hf-cachehooks`: the command line (parser and main here; commands in manage.py and models.py). It prints."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from .._core.extras import missing_dependency
from .._core.freshness import parse_duration
from .._core.store import cache_root
from .._models.extraction import POSITIONS
from ..errors import HFCacheHooksError
from .checkpoints import add_eval_checkpoints_args, cmd_eval_checkpoints
from .harness import LM_EVAL, run_lm_eval, split_lm_eval
from .manage import cmd_clear, cmd_du, cmd_explain, cmd_ls, cmd_prune, cmd_pull, cmd_push, cmd_verify
from .models import (
    MODEL_DTYPES,
    STORAGE_DTYPES,
    cmd_analyze_probe,
    cmd_cache_activations,
    cmd_chat_server,
    cmd_generate_vectors,
    cmd_info,
    cmd_serve,
)
from .sweep import add_k_sweep_args, cmd_k_sweep
from .words import in_cli_words


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, except where there is none to show (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class _Renamed(argparse.Action):
    """An old spelling of an option: hidden from --help, still accepted, and says the new name."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"warning: {option_string} is deprecated here; use {self.new}.", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _duration(unit: timedelta | None = None) -> Callable[[str], timedelta]:
    """An argparse type: `7d`, `12h`, ... as a `timedelta` (a plain number in `unit`, else refused)."""

    def parse(text: str) -> timedelta:
        try:
            return parse_duration(text, unit)
        except HFCacheHooksError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (e.g. 8)")
    return value


def _global_args(p: argparse.ArgumentParser, after_command: bool) -> None:
    """Options every command accepts, before or after its name (after it, they override the ones before)."""
    p.add_argument(
        "--cache-dir",
        default=argparse.SUPPRESS if after_command else None,
        help="cache root (default: $HF_CACHEHOOKS_HOME, else outputs/cache)",
    )


def _model_args(p: argparse.ArgumentParser, required: bool, encoder: bool = True) -> None:
    """The flags `_load` reads: --model, --gguf-file, --model-dtype and (for extraction) --encoder."""
    p.add_argument("--model", required=required, help="model folder or Hub name")
    p.add_argument(
        "--gguf-file",
        help="a GGUF file in the --model folder to read weights and tokenizer from "
        "(default: none, the folder's own weights)",
    )
    p.add_argument(
        "--model-dtype", choices=MODEL_DTYPES, default="float32", help="dtype the model's weights are loaded in"
    )
    if encoder:
        p.add_argument(
            "--encoder", action="store_true", help="load the bare model without a head (encoders such as MiniLM)"
        )
    else:
        p.set_defaults(encoder=False)  # generation needs a causal LM


def _activation_args(p: argparse.ArgumentParser, model_required: bool) -> None:
    _model_args(p, model_required)
    p.add_argument(
        "--positions",
        choices=POSITIONS,
        default="last",
        help="which tokens to keep: the last or first real token, their mean, or all (a row per token)",
    )
    p.add_argument(
        "--dtype",
        choices=STORAGE_DTYPES,
        default="float16",
        help="storage dtype of the cached activations (the model's is --model-dtype)",
    )
    p.add_argument("--text-field", default="text", help="record field holding the text")
    p.add_argument(
        "--label-field",
        default=None,
        help="record field holding the label (default: 'type' when present, else 'label')",
    )
    p.add_argument("--batch-size", type=_positive, default=8, help="texts per forward pass")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-cachehooks",
        description="Inspect and manage hf_cachehooks caches.",
        formatter_class=_HelpFormatter,
        epilog=f"{LM_EVAL} ARGS...: lm-evaluation-harness's own CLI with --model hf-cachehooks registered; ARGS "
        "go to lm-eval unchanged (docs/harness.md).",
    )
    _global_args(parser, after_command=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, about: str, run) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=about, description=about, formatter_class=_HelpFormatter)
        _global_args(p, after_command=True)
        p.set_defaults(run=run)
        return p

    ls = command("ls", "list entries: kind, model, size, age, key", cmd_ls)
    ls.add_argument(
        "--kind",
        help="an entry kind (predictions, generations, activations, conversation, ...) "
        "or a top folder (experiments, conversations, ...); default: all",
    )
    ls.add_argument("--all", action="store_true", help="also list memos (identity, file-hashes, last-miss)")
    ls.add_argument("--format", choices=("table", "json"), default="table", help="output format")

    command("du", "bytes used per entry kind", cmd_du)

    prune = command(
        "prune", "remove entries older than a duration (conversations: idle that long; pinned ones stay)", cmd_prune
    )
    prune.add_argument(
        "--older-than", required=True, metavar="DURATION", help="a number and a unit: 45s, 30m, 12h, 7d, 2w"
    )
    prune.add_argument("--kind", help="only entries of this kind or top folder; default: all")
    prune.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")

    clear = command("clear", "remove every entry (of one kind); asks first, or needs --yes", cmd_clear)
    clear.add_argument("--kind", help="only entries of this kind or top folder; default: all")
    clear.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")
    clear.add_argument("--yes", action="store_true", help="delete without asking (scripts, no terminal)")

    ver = command(
        "verify", "hash every file of every entry against its manifest (exit 1 if any is corrupt)", cmd_verify
    )
    ver.add_argument("path", nargs="?", help="an activation cache folder (default: the whole cache root)")
    ver.add_argument("--kind", help="only entries of this kind or top folder; default: all")

    for name, about, run in (
        (
            "push",
            "upload the entries a remote root lacks from the cache root (only what is missing; resumable)",
            cmd_push,
        ),
        ("pull", "fetch the entries the cache root lacks from a remote root (each verified; resumable)", cmd_pull),
    ):
        copy = command(name, about, run)
        copy.add_argument(
            "url",
            help="the remote root, e.g. s3://bucket/team-cache (endpoint and credentials "
            "from the standard environment: AWS_ENDPOINT_URL, AWS_PROFILE, ...)",
        )
        copy.add_argument("--dry-run", action="store_true", help="list what would be copied; copy nothing")

    exp = command("explain", "which key fields differ between two entries, or why the last lookup missed", cmd_explain)
    exp.add_argument("a", nargs="?", help="entry file or key prefix (none: the last miss)")
    exp.add_argument("b", nargs="?", help="entry file or key prefix to compare with")

    serve = command("serve", "an OpenAI-compatible completion and chat server for a transformers model", cmd_serve)
    _model_args(serve, required=True, encoder=False)
    serve.add_argument("--dtype", dest="model_dtype", action=_Renamed, new="--model-dtype")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    serve.add_argument("--port", type=int, default=8000, help="port")
    serve.add_argument(
        "--name", help="model name the server answers to; requests naming another get a 404 (default: --model)"
    )
    serve.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap each /v1/completions prompt in the chat template (/v1/chat/completions always is)",
    )
    serve.add_argument("--system-prompt", help="system turn for --chat-template (default: none)")
    serve.add_argument("--batch-size", type=_positive, default=8, help="sequences decoded together")
    serve.add_argument(
        "--max-model-len",
        type=_positive,
        help="longest prompt + completion in tokens (default: the model's max_position_embeddings)",
    )

    cache = command(
        "cache-activations", "extract hidden states at some layers into an Arrow cache", cmd_cache_activations
    )
    _activation_args(cache, model_required=True)
    cache.add_argument("--data", required=True, help="JSON/JSONL records (text + label) or contrastive pairs")
    cache.add_argument("--layers", required=True, help="comma-separated, e.g. 10,20,30 (0 = embeddings)")
    cache.add_argument("--output", required=True, help="the cache folder to fill (an interrupted run resumes)")
    cache.add_argument(
        "--shard-size",
        type=_positive,
        default=None,
        help="examples per shard, the resume unit (default: about 32 MiB of activations, at least 1024)",
    )
    cache.add_argument("--chat-template", action="store_true", help="wrap each text in the chat template first")
    cache.add_argument("--system-prompt", help="system turn for --chat-template (default: none)")
    cache.add_argument("--max-length", type=_positive, help="truncate texts to this many tokens (default: never)")
    cache.add_argument("--force", action="store_true", help="replace a cache made from other inputs")
    cache.add_argument(
        "--max-age",
        type=_duration(),
        default=None,
        metavar="DURATION",
        help="re-extract a store older than this: 45s, 30m, 12h, 7d, 2w (default: never expires)",
    )
    cache.add_argument(
        "--max-age-days",
        dest="max_age",
        type=_duration(timedelta(days=1)),
        action=_Renamed,
        new="--max-age DURATION (e.g. 7d)",
    )

    vec = command("generate-vectors", "difference-of-means vectors per layer from a cache", cmd_generate_vectors)
    _activation_args(vec, model_required=False)
    vec.add_argument("--cache", help="activation cache folder (or --model/--data/--layers to fill one)")
    vec.add_argument("--data", help="records to cache first, with --model")
    vec.add_argument("--output", required=True, help="run folder RUN for RUN/normalized_vectors (rerun: replaced)")
    vec.add_argument("--layers", help="comma-separated (default: every cached layer)")
    vec.add_argument("--positive", help="label of the positive class (default: deployment, if present)")

    ana = command("analyze-probe", "score a cache with vectors: per-layer AUROC, CSVs, plots", cmd_analyze_probe)
    _activation_args(ana, model_required=False)
    ana.add_argument("--cache", help="activation cache folder (or --model/--data to fill one)")
    ana.add_argument("--vectors", required=True, help="RUN/normalized_vectors (or the run folder RUN)")
    ana.add_argument("--data", help="the records the cache was made from (checked)")
    ana.add_argument("--output", required=True, help="folder for the CSVs, summary and plots")
    ana.add_argument("--layers", help="comma-separated (default: every layer with a vector)")
    ana.add_argument("--visualize", action="store_true", help="write PNG plots")

    chat = command("chat-server", "HTTP API over the conversation token cache (logit lens per token)", cmd_chat_server)
    _model_args(chat, required=True, encoder=False)
    chat.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    chat.add_argument("--port", type=int, default=8000, help="port")
    chat.add_argument("--directory", help="token cache folder (default: <cache root>/conversations)")
    chat.add_argument(
        "--config",
        help="YAML file with the cache block (memory, disk, prefetch, ttl); see "
        "docs/conversation.md (default: the built-in settings)",
    )
    chat.add_argument(
        "--keep-kv",
        type=int,
        default=2,
        help="conversations whose model KV cache stays in memory between turns (0: rerun history)",
    )
    chat.add_argument("--top-k", type=_positive, default=10, help="lens candidates shown per token")
    chat.add_argument(
        "--max-new-tokens", type=_positive, default=64, help="reply length when a request does not give max_new_tokens"
    )
    chat.add_argument(
        "--max-new-tokens-cap",
        type=_positive,
        default=1024,
        help="the longest reply a request may ask for (more: HTTP 413)",
    )
    chat.add_argument(
        "--max-message-tokens",
        type=_positive,
        default=2048,
        help="the most tokens one new message may add in the chat template (more: HTTP 413)",
    )
    chat.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name to serve besides localhost, 127.0.0.1 and ::1 (repeatable); requests "
        "naming any other host are refused, so a web page cannot reach the API by DNS rebinding",
    )

    sweep = command(
        "k-sweep",
        "best-of-K and pass@k for several K from one cached sample set per temperature (JSON + PNG)",
        cmd_k_sweep,
    )
    _model_args(sweep, required=True, encoder=False)
    add_k_sweep_args(sweep)

    checkpoints = command(
        "eval-checkpoints",
        "evaluate every checkpoint-* of a Trainer run by path (ones seen before load no weights): table, JSON, PNG",
        cmd_eval_checkpoints,
    )
    add_eval_checkpoints_args(checkpoints)

    info = command("info", "layers, examples, dtype, size and key inputs of an activation cache", cmd_info)
    info.add_argument("folder", help="an activation cache folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    lm_eval = split_lm_eval(argv)
    if lm_eval is not None:  # lm-eval parses its own arguments, unchanged (see `harness.py`)
        try:
            return run_lm_eval(lm_eval[1], lm_eval[0])
        except HFCacheHooksError as exc:
            print(f"error: {in_cli_words(str(exc))}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    args.root = Path(cache_root(args.cache_dir))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        return args.run(args)
    except HFCacheHooksError as exc:
        message = str(exc)
    except ModuleNotFoundError as exc:  # an optional extra that is not installed
        error = missing_dependency(exc, f"hf-cachehooks {args.command}")
        if error is None:
            raise
        message = str(error)
    except OSError as exc:  # a user path that is missing or unreadable, a model name that is not found
        if exc.filename is not None and exc.strerror:
            message = f"{exc.filename}: {exc.strerror}. Check the path."
        else:
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    print(f"error: {in_cli_words(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
