"""Does SmolLM2 represent "this is a test" vs "this is a real user"? Cache once, probe in seconds.

    python examples/probe_eval_awareness.py                 # first run: loads SmolLM2, caches 6 layers
    python examples/probe_eval_awareness.py                 # later runs: no model, results in seconds

The probe workflow with the library API: cache activations for a training split and a validation
split of examples/data/eval_awareness.json (60 contrastive pairs, "testing" vs "deployment"), train
difference-of-means vectors on the training cache, then score the validation cache with them and
plot AUROC by layer with bootstrap intervals. A cache that already exists is opened without loading
the model; delete the folder (or pass --refresh) after changing the model or the data.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from hf_cachehooks import ActivationStore, ConfigError, cache_activations
from hf_cachehooks.activations.probing import analyze_probe, generate_vectors
from hf_cachehooks.activations.spec import load_records

HERE = Path(__file__).parent


def open_or_cache(folder: Path, rows: list[dict], layers: list[int], refresh: bool, model_box: dict) -> ActivationStore:
    if not refresh:
        try:
            store = ActivationStore(folder)
            if store.layers == layers:
                print(f"Using cached activations in {folder} (no model load)")
                return store
        except ConfigError:
            pass
    if "model" not in model_box:
        from sweep_layers import load_smollm2

        model_box["model"], model_box["tokenizer"] = load_smollm2()
    return cache_activations(
        model_box["model"], model_box["tokenizer"], rows, folder, layers, dtype="bfloat16", force=True
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="5,10,15,20,25,30")
    parser.add_argument("--train-pairs", type=int, default=40, help="pairs 0..N-1 train, the rest validate")
    parser.add_argument("--output", default="outputs/probe_eval_awareness")
    parser.add_argument("--refresh", action="store_true", help="re-extract even if the caches exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    started = time.perf_counter()
    layers = [int(x) for x in args.layers.split(",")]
    rows = load_records(HERE / "data" / "eval_awareness.json")
    out = Path(args.output)
    model_box: dict = {}
    train = open_or_cache(
        out / "cache_train", [r for r in rows if r["pair"] < args.train_pairs], layers, args.refresh, model_box
    )
    valid = open_or_cache(
        out / "cache_validation", [r for r in rows if r["pair"] >= args.train_pairs], layers, args.refresh, model_box
    )
    run = generate_vectors(train, out / "run")
    report = analyze_probe(valid, run / "normalized_vectors", out / "validation", visualize=True)
    print(f"\nHeld-out AUROC ({len(valid)} validation prompts, positive = deployment):")
    for row in report:
        print(f"  layer {row['layer']:>2}: {row['auroc']:.3f}  [{row['auroc_low']:.3f}, {row['auroc_high']:.3f}]")
    print(
        f"Plot: {out / 'validation' / 'auroc_by_layer.png'}   total {time.perf_counter() - started:.1f}s"
        f"{' (model loaded)' if model_box else ' (from cache, no model)'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
