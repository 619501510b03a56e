"""The `eval-checkpoints` command: every `checkpoint-*` folder of a Trainer run (and its final model) evaluated
by path through `evaluate_model`, as a step × metric table with the best step marked, JSON and a PNG.

A checkpoint evaluated before (by an earlier call, or in training through `remember_saved_model`) is a hit
that loads no weights. Under torchrun every rank evaluates (each its share of the rows); rank 0 prints and
writes the files.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import orjson

from ..errors import ConfigError, MissingDependencyError
from ..evaluation.metrics import METRICS

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
BEST_MARK = "*"  # every metric of the package is higher-is-better (exact_match, contains_answer, accuracy, macro_f1)


def add_eval_checkpoints_args(p: argparse.ArgumentParser) -> None:
    """The command's options (the flags of `k-sweep` where it has them; the global --cache-dir comes from the
    parser)."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="the Trainer's output_dir, holding checkpoint-* folders")
    p.add_argument("--data", required=True, help="JSON/JSONL records with a question and its answer(s)")
    p.add_argument(
        "--question-field",
        "--input-field",
        dest="input_field",
        default="question",
        help="record field fed to the model",
    )
    p.add_argument(
        "--answer-field",
        "--reference-field",
        dest="reference_field",
        default="answer",
        help="record field holding the answer(s)",
    )
    p.add_argument(
        "--prompt-template",
        help="format string over the record's fields, e.g. 'Q: {question}\\nA:' (default: the question as it is)",
    )
    p.add_argument("--limit", type=int, help="use only the first N records (default: all)")
    p.add_argument("--task", choices=("generation", "classification"), default="generation", help="what the model does")
    p.add_argument(
        "--metric",
        nargs="+",
        choices=METRICS,
        default=["exact_match", "contains_answer"],
        help="metrics to compute (all higher-is-better)",
    )
    p.add_argument(
        "--max-new-tokens",
        "--max-tokens",
        dest="max_new_tokens",
        type=int,
        default=64,
        help="longest completion, in tokens",
    )
    p.add_argument("--chat-template", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--system-prompt", help="system turn for --chat-template (default: none)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    p.add_argument(
        "--model-dtype",
        choices=("float32", "bfloat16", "float16"),
        help="dtype the checkpoints load in (default: bfloat16 on a GPU that supports it, else float32)",
    )
    p.add_argument("--device", help="where to run (default: this rank's GPU, else the CPU)")
    p.add_argument("--force-recompute", action="store_true", help="ignore cached predictions and recompute them")
    p.add_argument(
        "--output", default="outputs/eval_checkpoints", help="folder for checkpoints.json and checkpoints.png"
    )


def find_checkpoints(run_dir: Path) -> list[tuple[int | None, str, Path]]:
    """(step, label, folder) of each `checkpoint-<step>` folder holding a config.json, by step, then the run
    folder itself when it holds a model (the final one: its step from trainer_state.json, else None).

    Raises:
        ConfigError: `run_dir` is not a folder, or holds neither.
    """
    if not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR {run_dir}: no such folder. Pass the Trainer's output_dir.")
    found: list[tuple[int | None, str, Path]] = sorted(
        (int(match.group(1)), child.name, child)
        for child in run_dir.iterdir()
        if (match := _CHECKPOINT.fullmatch(child.name)) and (child / "config.json").is_file()
    )
    if (run_dir / "config.json").is_file():
        found.append((_final_step(run_dir), "final", run_dir))
    if not found:
        raise ConfigError(
            f"No checkpoint-* folder or model in RUN_DIR {run_dir}; pass the Trainer's output_dir "
            "(the folder holding checkpoint-<step>/ folders)."
        )
    return found


def _final_step(run_dir: Path) -> int | None:
    try:
        step = orjson.loads((run_dir / "trainer_state.json").read_bytes()).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def best_steps(records: list[dict], metrics: list[str]) -> dict[str, str]:
    """The label of the record with the highest value of each metric (the earliest of equals)."""
    best = {}
    for name in metrics:
        scored = [r for r in records if isinstance(r["metrics"].get(name), (int, float))]
        if scored:
            best[name] = max(scored, key=lambda r: r["metrics"][name])["label"]  # max keeps the first of equals
    return best


def _step_of(records: list[dict], label: str) -> int | None:
    return next(r["step"] for r in records if r["label"] == label)


def format_table(records: list[dict], metrics: list[str], best: dict[str, str]) -> str:
    """The step × metric table, the best value of each metric marked with `BEST_MARK`."""
    header = ["step", *metrics, "cache"]
    lines = []
    for r in records:
        cells = [str(r["step"]) if r["label"] != "final" else f"final ({r['step'] if r['step'] is not None else '?'})"]
        for name in metrics:
            value = r["metrics"].get(name)
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            cells.append(text + (BEST_MARK if best.get(name) == r["label"] else ""))
        cells.append(r["cache_status"])
        lines.append(cells)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *lines]]
    out.append(f"{BEST_MARK} best step of each metric (higher is better)")
    return "\n".join(out)


def _rows(args: argparse.Namespace) -> list[dict]:
    from .._core.rows import load_rows

    path = Path(args.data)
    if not path.is_file():
        raise ConfigError(f"--data {args.data}: no such file. Give a JSON or JSONL file of records.")
    try:
        rows = load_rows(path)
    except ValueError as exc:
        raise ConfigError(
            f"--data {args.data} is not valid JSON/JSONL ({exc}). Give a JSON list or JSONL records."
        ) from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"--data {args.data} does not hold a list of records (JSON objects).")
    rows = rows[: args.limit]
    if not rows:
        raise ConfigError(f"--data {args.data} holds no records.")
    wanted = [args.reference_field] + ([] if args.prompt_template else [args.input_field])
    missing = [f for f in wanted if f not in rows[0]]
    if missing:
        raise ConfigError(
            f"--data {args.data}: records have no {missing[0]!r} field (fields: {', '.join(sorted(rows[0]))}). "
            "Set --question-field / --answer-field."
        )
    return rows


def cmd_eval_checkpoints(args: argparse.Namespace) -> int:
    from .._core.cache_config import CacheConfig
    from .._core.launch import world_from_env
    from .._core.store import atomic_write
    from ..evaluation.config import EvalConfig
    from ..evaluation.plots import plot_checkpoints
    from ..evaluation.runs import evaluate_model, render_prompts

    run_dir = Path(args.run_dir)
    checkpoints = find_checkpoints(run_dir)
    rows = _rows(args)
    config = EvalConfig(
        task=args.task,
        input_field=args.input_field,
        reference_field=args.reference_field,
        prompt_template=args.prompt_template,
        use_chat_template=args.chat_template,
        system_prompt=args.system_prompt,
        metrics=tuple(args.metric),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        device=args.device,
        model_dtype=args.model_dtype,
        cache=CacheConfig(root=args.root, force_recompute=args.force_recompute),
    )
    render_prompts(rows[:1], config)  # a bad --prompt-template fails before any checkpoint
    main = world_from_env().is_main
    records: list[dict[str, Any]] = []
    for i, (step, label, folder) in enumerate(checkpoints, 1):
        if main:
            print(f"[{i}/{len(checkpoints)}] {label}: evaluating {folder} ...", file=sys.stderr, flush=True)
        result = evaluate_model(str(folder), rows, config)
        records.append(
            {
                "step": step,
                "label": label,
                "path": str(folder),
                "metrics": result.metrics,
                "cache_status": result.cache_status,
            }
        )
        if main:
            print(f"[{i}/{len(checkpoints)}] {label}: {result.cache_status}", file=sys.stderr, flush=True)
    if not main:
        return 0
    metrics = list(args.metric)
    best = best_steps(records, metrics)
    print(format_table(records, metrics, best))
    out = Path(args.output)
    doc = {
        "run_dir": str(run_dir),
        "data": str(args.data),
        "examples": len(rows),
        "metrics": metrics,
        "higher_is_better": True,
        "best": {name: {"label": label, "step": _step_of(records, label)} for name, label in best.items()},
        "checkpoints": records,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "checkpoints.json", orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    try:
        plot = str(plot_checkpoints(records, metrics, out / "checkpoints.png", title=run_dir.name))
    except MissingDependencyError as exc:
        plot = f"(not drawn: {exc})"
    print(f"Results: {out / 'checkpoints.json'}  plot: {plot}")
    return 0
