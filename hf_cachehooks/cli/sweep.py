"""The `k-sweep` command: best-of-K and pass@k from one cached sample set per temperature (JSON + PNG).

Under torchrun every rank runs the command; rank 0 prints and writes the files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError


def add_k_sweep_args(p: argparse.ArgumentParser) -> None:
    """The command's options (the model flags come from the parser's shared `_model_args`)."""
    p.add_argument("--data", required=True, help="JSON/JSONL records with a question and its answer(s)")
    p.add_argument("--question-field", default="question", help="record field holding the question")
    p.add_argument("--answer-field", default="answer", help="record field holding an answer or a list of them")
    p.add_argument(
        "--prompt-template",
        help="format string over the record's fields, e.g. 'Q: {question}\\nA:' (default: the question as it is)",
    )
    p.add_argument("--limit", type=int, help="use only the first N records (default: all)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="K values (max K samples per prompt)")
    p.add_argument(
        "--temperature", type=float, nargs="+", default=[1.0], help="sampling temperatures, one sample set each"
    )
    p.add_argument(
        "--metric",
        choices=("exact_match", "contains_answer"),
        default="exact_match",
        help="how one sample is scored against the answers",
    )
    p.add_argument("--max-tokens", type=int, default=32, help="longest completion, in tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling (default: off)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the samples")
    p.add_argument("--prompt-name", help="names the prompt set in the cache (default: k-sweep-<data file name>)")
    p.add_argument("--chat-template", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--system-prompt", help="system turn for --chat-template (default: none)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over prompts")
    p.add_argument("--output", default="outputs/k_sweep", help="folder for k_sweep.json and k_sweep.png")


def _rows(args: argparse.Namespace) -> tuple[list[str], list]:
    from .._core.rows import load_rows

    path = Path(args.data)
    if not path.is_file():
        raise ConfigError(f"--data {args.data}: no such file. Give a JSON or JSONL file of records.")
    rows = load_rows(path)[: args.limit]
    if not rows:
        raise ConfigError(f"--data {args.data} holds no records.")
    missing = [f for f in (args.question_field, args.answer_field) if f not in rows[0]]
    if missing:
        raise ConfigError(
            f"--data {args.data}: records have no {missing[0]!r} field (fields: "
            f"{', '.join(sorted(rows[0]))}). Set --question-field / --answer-field."
        )
    try:
        prompts = [
            args.prompt_template.format(**r) if args.prompt_template else str(r[args.question_field]) for r in rows
        ]
    except KeyError as exc:
        raise ConfigError(f"--prompt-template names {exc}, which the records do not have.") from None
    return prompts, [r[args.answer_field] for r in rows]


def cmd_k_sweep(args: argparse.Namespace) -> int:
    from .._core.cache_config import CacheConfig
    from ..sweeps.k_sweep import ModelBackend, k_sweep
    from ..sweeps.ranks import rank_and_world

    prompts, references = _rows(args)
    backend = ModelBackend(
        args.model,
        gguf_file=args.gguf_file,
        model_dtype=args.model_dtype,
        batch_size=args.batch_size,
        use_chat_template=args.chat_template,
        system_prompt=args.system_prompt,
    )
    result = k_sweep(
        prompts,
        references,
        backend,
        model=args.model,
        ks=args.k,
        temperatures=args.temperature,
        metric=args.metric,
        prompt_name=args.prompt_name or f"k-sweep-{Path(args.data).stem}",
        max_tokens=args.max_tokens,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
        bootstrap=args.bootstrap,
        cache=CacheConfig(root=args.root, max_age=None),
    )
    if rank_and_world()[0] != 0:
        return 0
    print(result.summary())
    print(result.table())
    out = Path(args.output)
    print(f"Results: {result.to_json(out / 'k_sweep.json')}  plot: {result.plot(out / 'k_sweep.png')}")
    return 0
