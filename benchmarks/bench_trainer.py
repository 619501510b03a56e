"""Benchmark the Trainer with no speed-ups, with `SpeedupCallback()` alone, and with the speed-ups planned.

Same random-init Llama (saved once to a temp dir, loaded by every arm), same synthetic token data
(sequences of random length, fixed seed), same batch size, learning rate, seed and max_steps. Modes:

- plain:     every speed-up off: eager attention, optim="adamw_torch", fp32, no TF32, no compile,
             0 workers, dynamic padding. (transformers' own default attention is sdpa and its default
             optimizer fused AdamW; plain turns both off so the other arms have something to turn on.)
- callback:  the plain Trainer, built the same way, plus `callbacks=[SpeedupCallback()]`: at train start
             it switches attention (flash_attention_2 where its kernel runs in bf16/fp16, else sdpa), fused
             AdamW, TF32 on Ampere+, and with --compile an in-place `torch.compile`. It cannot change
             precision, batch size, workers or padding, so those stay as in plain.
- planned:   `speedups.plan(SpeedupConfig(...))` before the Trainer: the model loaded with the planned
             attention, `TrainingArguments(**plan.training_args_kwargs())` (bf16/fp16 on a GPU, fused AdamW,
             TF32, workers, compile through the Trainer with --compile) and `plan.data_collator` padding.

Runs alternate (plain, callback, planned, plain, ...). Every arm is timed by the same callback
(on_step_begin -> on_step_end, perf_counter, with a CUDA synchronize on a GPU); the first `--warmup` steps of
each run are left out (compilation happens there). Samples/s = batch x steady steps / their summed time.
Before the Trainer runs, each switch is also timed alone, A and B alternated on one model and one batch:
forward+backward eager vs sdpa, and `AdamW.step()` plain vs with the param groups' `fused` flag set. On shared
cores these alternated figures hold up better than whole runs, whose spread can exceed the differences.

    HF_HUB_OFFLINE=1 python benchmarks/bench_trainer.py                      # all modes, CPU or the GPU
    HF_HUB_OFFLINE=1 python benchmarks/bench_trainer.py --quick               # 2 layers, 10 steps, 2 runs
    python benchmarks/bench_trainer.py --mode plain --mode callback --steps 40 --device cuda --compile

Options: --mode (repeat it; default all three), --steps, --runs, --warmup, --device auto|cpu|cuda,
--compile (ask for torch.compile in callback and planned), --threads (torch intra-op threads, default 1 on CPU:
the cores are shared), --quick. The model is 8 layers / hidden 256 on CPU and 12 layers / hidden 768 / 512-token
sequences on a GPU. It prints a table and writes every figure with machine info to
benchmarks/results/bench_trainer[_cuda][_quick].json.
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

from hf_cachehooks import SpeedupCallback, SpeedupConfig, speedups

LIBRARIES = ("hf_cachehooks", "torch", "transformers", "accelerate", "datasets")
MODES = ("plain", "callback", "planned")
RESULTS = Path(__file__).resolve().parent / "results" / "bench_trainer.json"
LR, SEED = 5e-4, 42
FP32_PRECISION = getattr(torch.backends, "fp32_precision", None)  # TF32 off, as at start, before every run


class StepTimer(TrainerCallback):
    """The one timer every arm uses: step time, end-to-end interval, non-padding tokens per step."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.steps: list[float] = []
        self.intervals: list[float] = []
        self.tokens: list[int] = []
        self.t_begin = self._t0 = self._last_end = 0.0
        self._tok0 = 0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.t_begin = self._last_end = self._now()

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0, self._tok0 = self._now(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        self.steps.append(now - self._t0)
        self.intervals.append(now - self._last_end)
        self.tokens.append(state.num_input_tokens_seen - self._tok0)
        self._last_end = now


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(vocab_size - 4)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_model_dir(tmp: Path, layers: int, hidden: int, heads: int, vocab: int, positions: int) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=positions,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    path = tmp / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def make_data(n: int, lo: int, hi: int, vocab: int) -> Dataset:
    rng = random.Random(SEED)
    rows = [[rng.randrange(4, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    return Dataset.from_dict({"input_ids": rows})


def run_arm(mode: str, setup: dict, model_dir: str, data: Dataset, tok, out: Path) -> dict:
    torch._dynamo.reset()  # each run compiles from a fresh dynamo state (inductor's disk cache persists)
    if hasattr(torch.backends, "fp32_precision"):  # TrainingArguments(tf32=True) sets it for the process, for good
        torch.backends.fp32_precision = FP32_PRECISION
    cuda = setup["device"] == "cuda"
    common = dict(
        output_dir=str(out), max_steps=setup["steps"], learning_rate=LR, seed=SEED, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, per_device_train_batch_size=setup["batch"],
        include_num_input_tokens_seen="non_padding",
    )  # fmt: skip
    timer = StepTimer(cuda)
    callbacks: list = [timer]
    config = SpeedupConfig(per_device_train_batch_size=setup["batch"], torch_compile=setup["compile"])
    if mode == "planned":
        plan = speedups.plan(config)
        model = speedups.load_model(model_dir, plan)
        args = TrainingArguments(**{**common, **plan.training_args_kwargs()})
        collator = plan.data_collator(tok)
        callback = SpeedupCallback(plan, warmup_steps=setup["warmup"], report_path=out / "report.json")
    else:
        model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
        args = TrainingArguments(optim="adamw_torch", dataloader_num_workers=0, use_cpu=not cuda, **common)
        collator = DataCollatorForLanguageModeling(tok, mlm=False)
        callback = SpeedupCallback(config, warmup_steps=setup["warmup"], report_path=out / "report.json")
    if mode != "plain":
        callbacks.append(callback)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    load, start = os.getloadavg()[0], time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    run = {
        "mode": mode, "wall_s": wall, "loadavg_1min_before": load, "train_loss": result.training_loss,
        "step_s": timer.steps, "interval_s": timer.intervals, "tokens": timer.tokens,
        "time_to_first_steady_step_s": sum(timer.intervals[: setup["warmup"]]),
        "attention": model.config._attn_implementation, "optimizer": type(optimizer).__name__,
        "fused": all(g.get("fused") for g in optimizer.param_groups),
        "precision": str(trainer.accelerator.mixed_precision),
    }  # fmt: skip
    if mode != "plain":
        run.update(
            recompiles=callback.recompiles, observed=callback.observed, mismatches=callback.mismatches,
            switches=[{"setting": s.setting, "after": s.after, "status": s.status} for s in callback.switches],
        )  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    return run


def components(model_dir: str, data: Dataset, tok, device: str, batch: int, repeats: int) -> dict:
    """Each switch alone, A and B alternated `repeats` times on one model and one batch (robust to shared cores).

    attention: forward + backward, eager vs sdpa. optimizer: `AdamW.step()` on every parameter with the
    for-loop/foreach kernel vs the same optimizer with `fused=True` on its param groups.
    """
    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager").to(device).train()
    inputs = DataCollatorForLanguageModeling(tok, mlm=False)([data[i] for i in range(batch)])
    inputs = {k: v.to(device) for k, v in inputs.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    timer = StepTimer(device == "cuda")
    times: dict[str, list[float]] = {"eager": [], "sdpa": [], "adamw": [], "adamw_fused": []}
    for _ in range(repeats):
        for attention in ("eager", "sdpa"):
            model.set_attn_implementation(attention)
            t0 = timer._now()
            model(**inputs).loss.backward()
            times[attention].append(timer._now() - t0)
        for name, fused in (("adamw", None), ("adamw_fused", True)):
            for group in optimizer.param_groups:
                group["fused"] = fused
            t0 = timer._now()
            optimizer.step()
            times[name].append(timer._now() - t0)
        optimizer.zero_grad()
    med = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}  # the first of each is warm-up
    return {
        "repeats": repeats, "median_ms": med, "forward_backward_eager_over_sdpa": med["eager"] / med["sdpa"],
        "optimizer_step_plain_over_fused": med["adamw"] / med["adamw_fused"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip


def summarise(runs: list[dict], warmup: int, batch: int) -> dict:
    steady = [s for r in runs for s in r["step_s"][warmup:]]
    intervals = [s for r in runs for s in r["interval_s"][warmup:]]
    tokens = sum(t for r in runs for t in r["tokens"][warmup:])
    return {
        "runs": len(runs), "steady_steps": len(steady), "median_step_ms": statistics.median(steady) * 1e3,
        "run_median_step_ms": [statistics.median(r["step_s"][warmup:]) * 1e3 for r in runs],
        "median_interval_ms": statistics.median(intervals) * 1e3,
        "samples_per_s": batch * len(steady) / sum(steady), "tokens_per_s": tokens / sum(steady),
        "time_to_first_steady_step_s": [r["time_to_first_steady_step_s"] for r in runs],
        "recompiles": [r.get("recompiles") for r in runs], "train_loss": [r["train_loss"] for r in runs],
        "in_effect": {k: runs[0][k] for k in ("attention", "fused", "precision")},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", action="append", choices=MODES, help="an arm to run (repeat; default: all three)")
    parser.add_argument("--steps", type=int, help="max_steps per run (default 30, --quick 10)")
    parser.add_argument("--runs", type=int, help="runs per mode (default 3, --quick 2)")
    parser.add_argument("--warmup", type=int, default=3, help="steps per run left out of throughput")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--compile", action="store_true", help="ask for torch.compile in callback and planned")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: 1 on CPU, torch's on a GPU)")
    parser.add_argument("--quick", action="store_true", help="2 layers, hidden 64, 10 steps, 2 runs")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA GPU")
    modes = [m for m in MODES if m in (args.mode or MODES)]
    if args.quick:
        layers, hidden, heads, vocab, lengths, batch = 2, 64, 4, 2048, (32, 128), 8
    elif device == "cuda":
        layers, hidden, heads, vocab, lengths, batch = 12, 768, 12, 32000, (256, 512), 16
    else:
        layers, hidden, heads, vocab, lengths, batch = 8, 256, 4, 8192, (32, 128), 8
    setup = {
        "device": device, "steps": args.steps or (10 if args.quick else 30), "warmup": args.warmup,
        "batch": batch, "compile": args.compile, "layers": layers, "hidden": hidden, "heads": heads, "vocab": vocab,
        "lengths": lengths, "sequences": 256, "lr": LR, "seed": SEED, "modes": modes,
    }  # fmt: skip
    runs = args.runs or (2 if args.quick else 3)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    threads = args.threads if args.threads is not None else (1 if device == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)

    tmp = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor")  # cold first compile, nothing left behind
    t_start = time.perf_counter()
    results: dict[str, list[dict]] = {}
    try:
        model_dir = make_model_dir(tmp, layers, hidden, heads, vocab, lengths[1])
        data, tok = make_data(setup["sequences"], *lengths, vocab), make_tokenizer(vocab)
        parts = components(model_dir, data, tok, device, batch, 6 if args.quick else 12)
        for i in range(runs):
            for mode in modes:
                run = run_arm(mode, setup, model_dir, data, tok, tmp / f"out{i}_{mode}")
                results.setdefault(mode, []).append(run)
                print(
                    f"[{time.perf_counter() - t_start:6.0f} s] {mode:<9} median step "
                    f"{statistics.median(run['step_s'][args.warmup :]) * 1e3:8.1f} ms, {run['attention']}, "
                    f"fused={run['fused']}, {run['precision']}, recompiles {run.get('recompiles', '-')}",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total_s = time.perf_counter() - t_start

    summary = {mode: summarise(rs, args.warmup, batch) for mode, rs in results.items()}
    base = summary.get("plain", next(iter(summary.values())))["median_step_ms"]
    for s in summary.values():
        s["speedup_over_plain"] = base / s["median_step_ms"]
    where = torch.cuda.get_device_name() if device == "cuda" else machine(LIBRARIES)["cpu"]
    print(
        f"\n{where}: Llama {layers} layers, hidden {hidden}, vocab {vocab}; batch {batch}, {setup['steps']} steps/run,"
        f" first {args.warmup} excluded; {setup['sequences']} sequences of {lengths[0]}-{lengths[1]} tokens;"
        f" compile {'asked' if args.compile else 'off'}; torch threads {torch.get_num_threads()}\n"
    )
    print(f"{'mode':<9} {'runs':>4} {'step ms':>8} {'samples/s':>9} {'tokens/s':>9} {'vs plain':>8}  in effect")
    for mode, s in summary.items():
        e = s["in_effect"]
        print(
            f"{mode:<9} {s['runs']:>4} {s['median_step_ms']:>8.1f} {s['samples_per_s']:>9.1f} {s['tokens_per_s']:>9.0f}"
            f" {s['speedup_over_plain']:>7.2f}x  {e['attention']}, fused={e['fused']}, {e['precision']}"
        )
    med = parts["median_ms"]
    print(
        f"\nEach switch alone, alternated {parts['repeats']} times on one batch ({parts['parameters'] / 1e6:.1f}M"
        f" parameters):\n  forward+backward  eager {med['eager']:.1f} ms, sdpa {med['sdpa']:.1f} ms"
        f" ({parts['forward_backward_eager_over_sdpa']:.2f}x)\n  optimizer step    AdamW {med['adamw']:.1f} ms,"
        f" fused {med['adamw_fused']:.1f} ms ({parts['optimizer_step_plain_over_fused']:.2f}x)"
    )
    print(f"(total {total_s:.0f} s)")
    suffix = ("_cuda" if device == "cuda" else "") + ("_quick" if args.quick else "")
    out_path = RESULTS.with_name(f"{RESULTS.stem}{suffix}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "quick": args.quick, "machine": machine(LIBRARIES), "device_name": where, "total_s": total_s, "setup": setup,
        "runs_per_mode": runs, "summary": summary, "components": parts, "runs": results,
    }  # fmt: skip
    out_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"Wrote {out_path}")


if __name__ == "__main__":
    main()
