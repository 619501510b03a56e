"""Best-of-K / pass@k on arithmetic questions with SmolLM2, from one cached sample set per temperature.

    python examples/k_sweep.py --k 1 2 4 8 16 --temperature 0.7 1.0   # first run: 16 samples per question
    python examples/k_sweep.py --k 1 2 4 8 16 --temperature 0.7 1.0   # again: cache hit, no generation, no load
    python examples/k_sweep.py --k 1 2 4 8 16 32 --temperature 0.7    # generates only samples 16..31
    torchrun --nproc_per_node 2 examples/k_sweep.py --k 1 2 4 8 16     # the samples shared out over 2 processes

Each question ("What is 17 - 8?", after three worked examples) is answered max(K) times at each
temperature through the generation cache; every answer is scored (does it contain the right number?),
and for every K the script reports best-of-K (the best of the first K samples) and the unbiased pass@k
estimate, with 95% bootstrap intervals over questions. Writes outputs/k_sweep/k_sweep.json and k_sweep.png.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

from hf_cachehooks import CacheConfig, ModelBackend, k_sweep

sys.path.insert(0, str(Path(__file__).parent))
from main import GGUF, smollm2_folder  # noqa: E402  (the example next to this one finds the model)

FEW_SHOT = "Q: What is 3 + 4?\nA: 7\nQ: What is 12 + 9?\nA: 21\nQ: What is 15 - 6?\nA: 9\nQ: {question}\nA:"


def arithmetic(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n small addition and subtraction questions as few-shot prompts, and their answers."""
    rng = random.Random(seed)
    prompts, answers = [], []
    for _ in range(n):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        op = rng.choice("+-") if a > b else "+"
        prompts.append(FEW_SHOT.format(question=f"What is {a} {op} {b}?"))
        answers.append(str(a + b if op == "+" else a - b))
    return prompts, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="K values")
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.7, 1.0], help="one sample set each")
    parser.add_argument("--questions", type=int, default=12, help="number of arithmetic questions")
    parser.add_argument("--max-tokens", type=int, default=4, help="longest answer, in tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    parser.add_argument("--cache-dir", help="cache root (default: $HF_CACHEHOOKS_HOME, else outputs/cache)")
    parser.add_argument("--output", default="outputs/k_sweep", help="folder for k_sweep.json and k_sweep.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    started = time.perf_counter()
    questions, answers = arithmetic(args.questions)
    # loads SmolLM2 only if a sample is missing; the prompts are few-shot completions ("Q: ...\nA:")
    backend = ModelBackend(smollm2_folder(), gguf_file=GGUF, batch_size=args.batch_size)
    result = k_sweep(
        questions,
        answers,
        backend,
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        ks=args.k,
        temperatures=args.temperature,
        metric="contains_answer",
        prompt_name="arithmetic",
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        cache=CacheConfig(root=args.cache_dir, max_age=None),
    )
    if result.settings["processes"] > 1 and not _is_rank_zero():
        return 0
    print(result.summary())
    print(result.table())
    out = Path(args.output)
    print(f"Results: {result.to_json(out / 'k_sweep.json')}  plot: {result.plot(out / 'k_sweep.png')}")
    print(f"total {time.perf_counter() - started:.1f}s ({'model loaded' if backend.loads else 'no model load'})")
    return 0


def _is_rank_zero() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
