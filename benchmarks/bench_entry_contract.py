"""The entry contract's cost on the hit paths: this tree against an earlier commit, side by side in one run.

Measured in alternating subprocesses (earlier, this, earlier, this, ...) so both sides share the
machine's load:

1. Whole-run hit, `PredictionCache.load_run`, 1k and 10k predictions (the `evaluate_model` hit).
2. Resume: `PredictionCache.load_examples` over 10 shards of 1,000 per-example predictions.
3. Opening an entry whose file is 256 MiB, with the default checks (size + stamp) and with
   `check="hash"` (what `hf-cachehooks verify` does), as GB/s: the cost of full verification.

Run it from the repository root (OMP_NUM_THREADS=1; no model, no network):

    . .venv/bin/activate
    python benchmarks/bench_entry_contract.py                 # against 0f3370d, the last commit before the contract
    python benchmarks/bench_entry_contract.py --before HEAD~3 --rounds 5

It prints a table and writes benchmarks/results/bench_entry_contract.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import machine  # benchmarks/machine.py

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "bench_entry_contract.json"
BEFORE = "0f3370d"

WORKER = r'''
import json, random, statistics, sys, tempfile, time
from pathlib import Path
from hf_cachehooks.keys import make_key
from hf_cachehooks.predictions import PredictionCache

rng = random.Random(0)
WORDS = "the of and to in is that for energy cell market theorem protein court vector species".split()
def text(n): return " ".join(rng.choices(WORDS, k=n // 4))[:n]
def timed(fn, reps):
    out = []
    for _ in range(reps):
        start = time.perf_counter(); fn(); out.append((time.perf_counter() - start) * 1e3)
    return statistics.median(out)

figures = {}
tmp = Path(tempfile.mkdtemp())
cache = PredictionCache(tmp / "predictions", clock=time.time, max_age_days=30)
for n in (1000, 10000):
    doc = {"metadata": {"model_name": "org/m", "dataset_size": n, "created_at": time.time()},
           "predictions": [text(200) for _ in range(n)], "references": [rng.choice("ABCD") for _ in range(n)],
           "metrics": {"accuracy": 0.4}, "metric_versions": {"accuracy": "1"}}
    key = make_key("predictions", {"model": "org/m", "n": n})
    cache.save_run(key, "org/m", doc)
    assert cache.load_run(key, "org/m")["predictions"] == doc["predictions"]
    figures[f"run_hit_{n}_ms"] = timed(lambda: cache.load_run(key, "org/m"), 40 if n == 1000 else 15)
predictor = make_key("examples", {"model": "org/m"})
for s in range(10):
    cache.save_examples(predictor, {f"{s}-{i}": text(200) for i in range(1000)}, f"b{s}")
assert len(cache.load_examples(predictor)) == 10000
figures["resume_10x1000_ms"] = timed(lambda: cache.load_examples(predictor), 15)
try:
    from hf_cachehooks import entry
except ImportError:
    entry = None
if entry is not None:
    folder = tmp / "big"
    folder.mkdir()
    data = bytes(rng.getrandbits(8) for _ in range(1 << 20)) * 256  # 256 MiB
    rec = entry.write_file(folder, "data.bin", data)
    entry.commit(folder / "m.json", "bench", make_key("bench", {}), {"data.bin": rec})
    gb = len(data) / 1e9
    figures["open_256MiB_stamp_ms"] = timed(lambda: entry.inspect(folder / "m.json", check="stamp"), 20)
    figures["open_256MiB_hash_ms"] = timed(lambda: entry.inspect(folder / "m.json", check="hash"), 5)
    figures["hash_gb_per_s"] = gb / (figures["open_256MiB_hash_ms"] / 1e3)
print(json.dumps(figures))
'''


def export(ref: str, into: Path) -> Path:
    """The package as it was at `ref`, unpacked into `into` (git archive: no checkout touched)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "hf_cachehooks"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def measure(path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", WORKER], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="git ref of the earlier tree (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per side (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        earlier = export(args.before, Path(tmp))
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for _ in range(args.rounds):
            runs["before"].append(measure(earlier))
            runs["after"].append(measure(REPO))
    medians = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
    rows = []
    print(f"{'hit path':<28} {'before ms':>10} {'after ms':>10} {'after/before':>13}")
    for name in ("run_hit_1000_ms", "run_hit_10000_ms", "resume_10x1000_ms"):
        b, a = medians["before"][name], medians["after"][name]
        rows.append({"name": name, "before_ms": b, "after_ms": a, "ratio": a / b})
        print(f"{name:<28} {b:>10.2f} {a:>10.2f} {a / b:>12.2f}x")
    after = medians["after"]
    print(f"open a 256 MiB entry: size+stamp {after['open_256MiB_stamp_ms']:.3f} ms, full hash "
          f"{after['open_256MiB_hash_ms']:.0f} ms ({after['hash_gb_per_s']:.2f} GB/s, "
          f"{1 / after['hash_gb_per_s']:.2f} s per GB)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"before": args.before, "rounds": args.rounds, "threads": "OMP_NUM_THREADS=1",
                                   "table": rows, "medians": medians, "runs": runs,
                                   "machine": machine(("hf_cachehooks", "orjson", "xxhash"))}, indent=2))
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
