"""The entry contract's cost on the hit paths: this tree against an earlier commit, side by side in one run.

1. `benchmarks/bench_prediction_cache.py --quick` of the earlier tree and of this one, alternating
   (earlier, this, earlier, this, ...) so both sides share the machine's load; the median of each row's
   "ours" figure per side, and their ratio (the `evaluate_model` whole-run hit, fingerprints, resume).
2. Opening an entry whose file is 256 MiB, with the default checks (size + stamp) and with
   `check="hash"` (what `hf-cachehooks verify` does), as GB/s: the cost of full verification, next to
   its floor, a plain read of the same file hashed with xxh3 (and a plain `os.stat` for the stamp check).
   Each figure is the median (nearest rank, `benchmarks/stats.py`) of round-robin repetitions.

Run it from the repository root (OMP_NUM_THREADS=1; no model, no network; about 1 minute):

    . .venv/bin/activate
    python benchmarks/bench_entry_contract.py                 # against 0f3370d, the last commit before the contract
    python benchmarks/bench_entry_contract.py --before HEAD~3 --rounds 5

It prints a table and writes benchmarks/results/bench_entry_contract.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import machine  # benchmarks/machine.py
from stats import percentile  # benchmarks/stats.py: the one percentile

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "bench_entry_contract.json"
BEFORE = "0f3370d"

WORKER = r"""
import json, os, sys, tempfile
from pathlib import Path
import xxhash
sys.path.insert(0, sys.argv[1])  # benchmarks/: the one percentile
from stats import interleaved
from hf_cachehooks._core import entry
from hf_cachehooks._core.keys import make_key

folder = Path(tempfile.mkdtemp())
data = os.urandom(1 << 20) * 256  # 256 MiB
rec = entry.write_file(folder, "data.bin", data)
entry.commit(folder / "m.json", "bench", make_key("bench", {}), {"data.bin": rec})
del data


def plain_hash():
    digest = xxhash.xxh3_128()
    with open(folder / "data.bin", "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


stamp = interleaved({"ours": lambda: entry.inspect(folder / "m.json", check="stamp"),
                     "plain_stat": lambda: os.stat(folder / "data.bin")}, 20)
full = interleaved({"ours": lambda: entry.inspect(folder / "m.json", check="hash"), "plain_read_xxh3": plain_hash}, 5)
figures = {"open_256MiB_stamp_ms": stamp["ours"]["median_ms"], "plain_stat_ms": stamp["plain_stat"]["median_ms"],
           "open_256MiB_hash_ms": full["ours"]["median_ms"], "plain_read_xxh3_ms": full["plain_read_xxh3"]["median_ms"]}
figures["hash_gb_per_s"] = 256 * (1 << 20) / 1e9 / (figures["open_256MiB_hash_ms"] / 1e3)
figures["hash_vs_plain"] = figures["plain_read_xxh3_ms"] / figures["open_256MiB_hash_ms"]
entry.remove_entry(folder / "m.json")
print(json.dumps(figures))
"""


def export(ref: str, into: Path) -> Path:
    """The package and benchmarks as they were at `ref`, unpacked into `into` (git archive: no checkout touched)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "hf_cachehooks", "benchmarks"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def bench_predictions(tree: Path, out: Path) -> dict[str, float]:
    """Run that tree's prediction-cache benchmark (--quick); its "ours" figure per row, in ms."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, str(tree / "benchmarks" / "bench_prediction_cache.py"), "--quick"],
        env=env,
        check=True,
        capture_output=True,
        cwd=out,
    )
    table = json.loads((tree / "benchmarks" / "results" / "bench_prediction_cache_quick.json").read_text())["table"]
    return {row["name"].split(" (vs")[0]: row["ours_ms"] for row in table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="git ref of the earlier tree (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per side (default: %(default)s)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        earlier = export(args.before, Path(tmp) / "before")
        for _ in range(args.rounds):
            runs["before"].append(bench_predictions(earlier, Path(tmp)))
            runs["after"].append(bench_predictions(REPO, Path(tmp)))
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        out = subprocess.run(
            [sys.executable, "-c", WORKER, str(REPO / "benchmarks")],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        verify = json.loads(out.stdout.strip().splitlines()[-1])
    rows = []
    print(f"{'bench_prediction_cache --quick (ours)':<40} {'before ms':>10} {'after ms':>10} {'after/before':>13}")
    for name in [name for name in runs["before"][0] if all(name in r for r in runs["after"])]:  # rows both have
        b = percentile([r[name] for r in runs["before"]], 50)
        a = percentile([r[name] for r in runs["after"]], 50)
        rows.append({"name": name, "before_ms": b, "after_ms": a, "ratio": a / b})
        print(f"{name:<40} {b:>10.3f} {a:>10.3f} {a / b:>12.2f}x")
    print(
        f"open a 256 MiB entry: size+stamp {verify['open_256MiB_stamp_ms']:.3f} ms, full hash "
        f"{verify['open_256MiB_hash_ms']:.0f} ms ({verify['hash_gb_per_s']:.2f} GB/s, "
        f"{1 / verify['hash_gb_per_s']:.2f} s per GB); a plain read + xxh3 of the file "
        f"{verify['plain_read_xxh3_ms']:.0f} ms ({verify['hash_vs_plain']:.2f}x of it), os.stat "
        f"{verify['plain_stat_ms']:.3f} ms"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "before": args.before,
                "rounds": args.rounds,
                "threads": "OMP_NUM_THREADS=1",
                "table": rows,
                "verify": verify,
                "runs": runs,
                "machine": machine(("hf_cachehooks", "orjson", "xxhash")),
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
