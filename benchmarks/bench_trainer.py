"""Benchmark a plain `transformers.Trainer` run against the same run with the `hf_cachehooks` speed-ups.

Same random-init Llama (saved once to a temp dir, loaded by every arm), same synthetic token data
(sequences of random length, fixed seed), same batch size, learning rate, seed and max_steps. Arms:

- plain:            optim="adamw_torch", 0 workers, default attention, dynamic padding (pad to the longest)
- speedups:         `speedups.plan(SpeedupConfig())` -> on a CPU: fused AdamW, sdpa, fp32, CPUs-1 workers
- compile_pad64:    `SpeedupConfig(torch_compile=True)`: inductor, pad_to_multiple_of=64 (full mode only)
- compile_dynamic:  the same with `pad_to_multiple_of=1` (dynamic padding: shows recompiles; full mode only)

Runs alternate (plain, speedups, [compile arms], plain, speedups, ...). Every arm is timed by the same
callback (on_step_begin -> on_step_end, perf_counter; the batch is fetched before on_step_begin, so data
loading is outside the step time, and the end-to-end interval between steps is reported beside it). The
first `--warmup` steps of each run are left out of throughput; for the compile arms that is where
compilation happens, reported as time-to-first-steady-step (train begin -> end of the last warm-up step).
Tokens are non-padding tokens (`include_num_input_tokens_seen="non_padding"` in every arm, plain included).
torch runs 1 intra-op thread by default (`--threads`): on shared cores, contended OpenMP threads swamp the signal.

Run it from the repository root:

    . .venv/bin/activate
    HF_HUB_OFFLINE=1 python benchmarks/bench_trainer.py            # full: 8 layers, hidden 256, 3 runs/arm
    HF_HUB_OFFLINE=1 python benchmarks/bench_trainer.py --quick    # 2 layers, hidden 64, 2 runs, no compile

It prints the speed-up plan and a table, and writes every figure, with machine info, to
benchmarks/results/bench_trainer.json. Model, outputs and the inductor cache live in a temp dir, removed
at the end (so the first compile of the run is cold; later compiles of the same graph hit that cache).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from machine import machine  # benchmarks/machine.py
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from hf_cachehooks.training import speedups
from hf_cachehooks.training.callbacks import SpeedupCallback
from hf_cachehooks.training.config import SpeedupConfig

LIBRARIES = ("hf_cachehooks", "torch", "transformers", "accelerate", "datasets")

RESULTS = Path(__file__).resolve().parent / "results" / "bench_trainer.json"
BATCH, LR, SEED = 8, 5e-4, 42


class StepTimer(TrainerCallback):
    """The one timer every arm uses: step time, end-to-end interval, non-padding tokens per step."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.intervals: list[float] = []
        self.tokens: list[int] = []
        self.t_begin = self._t0 = self._last_end = 0.0
        self._tok0 = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.t_begin = self._last_end = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0, self._tok0 = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.steps.append(now - self._t0)
        self.intervals.append(now - self._last_end)
        self.tokens.append(state.num_input_tokens_seen - self._tok0)
        self._last_end = now


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(vocab_size - 4)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_model_dir(tmp: Path, layers: int, hidden: int, heads: int, vocab: int) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    path = tmp / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def make_data(n: int, lo: int, hi: int, vocab: int) -> Dataset:
    rng = random.Random(SEED)
    return Dataset.from_dict({"input_ids": [[rng.randrange(4, vocab) for _ in range(rng.randint(lo, hi))]
                                            for _ in range(n)]})


def run_arm(arm: str, model_dir: str, data: Dataset, tok, out: Path, steps: int, warmup: int) -> dict:
    torch._dynamo.reset()  # each run compiles from a fresh dynamo state (inductor's disk cache persists)
    common = dict(output_dir=str(out), max_steps=steps, learning_rate=LR, seed=SEED, report_to=[],
                  save_strategy="no", logging_strategy="no", disable_tqdm=True)
    callbacks, plan = [StepTimer()], None
    if arm == "plain":
        model = LlamaForCausalLM.from_pretrained(model_dir)
        args = TrainingArguments(optim="adamw_torch", dataloader_num_workers=0, use_cpu=True,
                                 per_device_train_batch_size=BATCH, include_num_input_tokens_seen="non_padding",
                                 **common)
        collator = DataCollatorForLanguageModeling(tok, mlm=False)
    else:
        extra = {"speedups": {}, "compile_pad64": {"torch_compile": True},
                 "compile_dynamic": {"torch_compile": True, "pad_to_multiple_of": 1}}[arm]
        plan = speedups.plan(SpeedupConfig(per_device_train_batch_size=BATCH, **extra))
        model = speedups.load_model(model_dir, plan)
        args = TrainingArguments(**common, **plan.training_args_kwargs())
        collator = plan.data_collator(tok)
        report = out / "speedups_report.json"
        callbacks.append(SpeedupCallback(plan, warmup_steps=warmup, report_path=report))
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    load, start = os.getloadavg()[0], time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    timer, optimizer = callbacks[0], getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    run = {"arm": arm, "wall_s": wall, "loadavg_1min_before": load, "train_loss": result.training_loss,
           "step_s": timer.steps,
           "interval_s": timer.intervals, "tokens": timer.tokens,
           "time_to_first_steady_step_s": sum(timer.intervals[:warmup]), "first_step_s": timer.steps[0],
           "attention": model.config._attn_implementation, "optimizer": type(optimizer).__name__,
           "fused": bool(optimizer.defaults.get("fused"))}
    if plan is not None:
        cb = callbacks[1]
        run.update(recompiles=cb.recompiles, callback_throughput=cb.throughput(args), mismatches=cb.mismatches,
                   observed=cb.observed, plan_table=plan.table())
    shutil.rmtree(out, ignore_errors=True)
    return run


def summarise(runs: list[dict], warmup: int) -> dict:
    steady = [s for r in runs for s in r["step_s"][warmup:]]
    intervals = [s for r in runs for s in r["interval_s"][warmup:]]
    tokens = sum(t for r in runs for t in r["tokens"][warmup:])
    per_run = [statistics.median(r["step_s"][warmup:]) * 1e3 for r in runs]
    return {"runs": len(runs), "steady_steps": len(steady), "median_step_ms": statistics.median(steady) * 1e3,
            "run_median_step_ms": per_run, "median_interval_ms": statistics.median(intervals) * 1e3,
            "samples_per_s": BATCH * len(steady) / sum(steady), "tokens_per_s": tokens / sum(steady),
            "time_to_first_steady_step_s": [r["time_to_first_steady_step_s"] for r in runs],
            "recompiles": [r.get("recompiles") for r in runs], "train_loss": [r["train_loss"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, hidden 64, 10 steps, 2 runs, no compile")
    parser.add_argument("--runs", type=int, help="runs per arm (default 3, --quick 2)")
    parser.add_argument("--steps", type=int, help="max_steps per run (default 30, --quick 10)")
    parser.add_argument("--warmup", type=int, default=3, help="steps per run left out of throughput")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--compile-runs", type=int, default=1, help="runs per compile arm (0: skip; full mode)")
    args = parser.parse_args()
    layers, hidden, heads, vocab = (2, 64, 4, 2048) if args.quick else (8, 256, 4, 8192)
    runs, steps = args.runs or (2 if args.quick else 3), args.steps or (10 if args.quick else 30)
    compile_runs = 0 if args.quick else args.compile_runs
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor")  # cold first compile, nothing left behind
    t_start = time.perf_counter()
    try:
        model_dir = make_model_dir(tmp, layers, hidden, heads, vocab)
        data, tok = make_data(256, 32, 128, vocab), make_tokenizer(vocab)
        order = [a for i in range(runs) for a in ["plain", "speedups"]
                 + ["compile_pad64", "compile_dynamic"] * (i < compile_runs)]
        results: dict[str, list[dict]] = {}
        for i, arm in enumerate(order):
            run = run_arm(arm, model_dir, data, tok, tmp / f"out{i}", steps, args.warmup)
            results.setdefault(arm, []).append(run)
            print(f"[{time.perf_counter() - t_start:6.0f} s] {arm:<16} median step "
                  f"{statistics.median(run['step_s'][args.warmup:]) * 1e3:7.1f} ms, first-steady after "
                  f"{run['time_to_first_steady_step_s']:.1f} s, recompiles {run.get('recompiles', '-')}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total_s = time.perf_counter() - t_start

    summary = {arm: summarise(rs, args.warmup) for arm, rs in results.items()}
    plain_ms = summary["plain"]["median_step_ms"]
    for s in summary.values():
        s["ratio_plain_over_arm"] = plain_ms / s["median_step_ms"]
    plan_table = results["speedups"][0]["plan_table"]
    print(f"\nSpeed-up plan on this machine (arm 'speedups'):\n{plan_table}")
    if "compile_pad64" in results:
        print(f"\nSpeed-up plan (arm 'compile_pad64'):\n{results['compile_pad64'][0]['plan_table']}")
    print(f"\nLlama {layers} layers, hidden {hidden}, vocab {vocab}; batch {BATCH}, {steps} steps/run, first "
          f"{args.warmup} excluded; 256 seqs of 32-128 tokens\n")
    print(f"{'arm':<16} {'runs':>4} {'step ms':>8} {'e2e ms':>8} {'samples/s':>9} {'tokens/s':>9} "
          f"{'plain/arm':>9} {'1st steady s':>12} {'recompiles':>10} {'loss':>7}")
    for arm, s in summary.items():
        ttfs = "/".join(f"{t:.1f}" for t in s["time_to_first_steady_step_s"])
        recompiles = "/".join("-" if r is None else str(r) for r in s["recompiles"])
        print(f"{arm:<16} {s['runs']:>4} {s['median_step_ms']:>8.1f} {s['median_interval_ms']:>8.1f} "
              f"{s['samples_per_s']:>9.1f} {s['tokens_per_s']:>9.0f} {s['ratio_plain_over_arm']:>8.2f}x "
              f"{ttfs:>12} {recompiles:>10} {statistics.median(s['train_loss']):>7.4f}")
    notes = [
        "step ms: median on_step_begin->on_step_end over all steady steps of all runs; e2e ms: median interval "
        "between step ends (includes fetching the batch); plain/arm > 1 means the arm is faster.",
        "1st steady s: train begin -> end of the warm-up steps, per run (compile happens there; later compile "
        "runs hit the inductor cache this benchmark filled). loss: median train loss, the same work in every arm.",
        f"CPU only ({machine(LIBRARIES)['cpu']}, {os.cpu_count()} shared cores, "
        f"torch threads {torch.get_num_threads()}): "
        "fp32, no flash-attention, no TF32; the CPU speed-ups are fused AdamW, sdpa (transformers' default here "
        "too) and 1 dataloader worker, so small gains are expected; compile may or may not help.",
        "1 torch thread by default: other jobs share these 2 cores, and with 2 OpenMP threads a contended step "
        "went from ~50 ms to ~2 s in trials (--threads 0 keeps torch's default; see loadavg per run in the JSON).",
        "GPU figures were not measured in this benchmark.",
    ]
    if "compile_pad64" in summary:
        notes.insert(2, "compile_pad64 pads every batch to 64 or 128 (almost always 128: the longest of 8 lengths in "
                     "32-128), so it computes more padding per step than dynamic padding; tokens/s counts real tokens.")
    print("\n" + "\n".join(f"- {n}" for n in notes) + f"\n(total {total_s:.0f} s)")

    out_path = RESULTS.with_name(RESULTS.stem + "_quick.json") if args.quick else RESULTS  # keep full figures
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({
        "quick": args.quick, "machine": machine(LIBRARIES), "total_s": total_s,
        "setup": {"layers": layers, "hidden": hidden, "heads": heads, "vocab": vocab, "batch": BATCH, "lr": LR,
                  "seed": SEED, "steps": steps, "warmup": args.warmup, "runs": runs, "compile_runs": compile_runs,
                  "sequences": 256, "lengths": [32, 128], "order": order},
        "plan_table": plan_table, "summary": summary, "notes": notes,
        "runs": {arm: [{k: v for k, v in r.items() if k != "plan_table"} for r in rs] for arm, rs in results.items()},
    }, indent=2, default=str) + "\n")
    print(f"Wrote {out_path}")


if __name__ == "__main__":
    main()
