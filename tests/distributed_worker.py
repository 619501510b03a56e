"""One rank of a launched evaluation, for tests/test_distributed.py (run by torchrun; not a test itself).

    torchrun --standalone --nproc_per_node N tests/distributed_worker.py MODEL DATA OUT [--die-after B]

Calls `evaluate_model` exactly as a user script would and writes what this rank got to OUT/rank<R>.json,
with the number of prompts this rank generated. With --die-after B, rank 1 exits hard after saving B
batches (a crash mid-run).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import hf_cachehooks._models.runners as runners
from hf_cachehooks import EvalConfig, evaluate_model
from hf_cachehooks.evaluation.predictions import PredictionCache

CONFIG = EvalConfig(prompt_template="q : {question} a :", batch_size=2, max_new_tokens=4, metrics=("exact_match",))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--die-after", type=int, default=None)
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    generated = []
    real_generate = runners.generate

    def counting(model, tokenizer, prompts, config):
        generated.extend(prompts)
        return real_generate(model, tokenizer, prompts, config)

    runners.generate = counting
    if args.die_after is not None and rank == 1:
        real_save, saved = PredictionCache.save_examples, []

        def save_then_die(self, predictor, rows, name):
            done = real_save(self, predictor, rows, name)
            saved.append(name)
            if len(saved) >= args.die_after:
                os._exit(3)
            return done

        PredictionCache.save_examples = save_then_die  # type: ignore[method-assign]
    result = evaluate_model(args.model, args.data, CONFIG)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "predictions": result.predictions,
                "metrics": result.metrics,
                "status": result.cache_status,
                "reused": result.reused,
                "metadata": result.metadata,
                "generated": len(generated),
                "key": result.key,
            }
        )
    )


if __name__ == "__main__":
    main()
