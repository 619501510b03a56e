"""Benchmark the prediction cache against the tools people use today, side by side in one run.

Three comparisons, on the same payload for both sides:

1. Whole-run hit (1k and 10k predictions): `PredictionCache.load_run` vs a `joblib.Memory` hit, diskcache's
   `memoize` and raw `Cache.get`, and a plain orjson / pickle file of the same doc (the read floor), interleaved.
   "ours" is the first read in a process (read, checksum, parse); "ours_repeat" a repeat in the same process,
   which checks the file's stamp with one stat and copies the parsed entry.
2. Fingerprinting 100k MMLU-like rows: `fingerprint_data` vs `joblib.hash` vs `datasets` `Hasher.hash`,
   plus `fingerprint_data` on a `datasets.Dataset` (reuses its `_fingerprint`). "ours" repeats the call on the
   same rows (the scan for NaN/±inf is skipped for rows seen free of null); "first call" scans every time.
3. Resuming 100k per-example entries: `load_examples` (100 shards, then compacted) + a lookup of every
   example hash vs lm-eval-harness's CachingLM pattern (`SqliteDict(autocommit=True)`, `in` + `[]`) and one
   `diskcache.Cache.get` per example.

Timings: medians and nearest-rank p99 (benchmarks/stats.py); the results JSON records the load average at start.
The public `evaluate_model` hit, identity and explain are in bench_hit_path.py.

Run it from the repository root (needs `pip install 'hf_cachehooks[bench]' datasets`):

    . .venv/bin/activate
    HF_HUB_OFFLINE=1 python benchmarks/bench_prediction_cache.py            # full size
    HF_HUB_OFFLINE=1 python benchmarks/bench_prediction_cache.py --quick    # 10k rows, fewer reps

It prints a table and writes every figure, with machine info, to
benchmarks/results/bench_prediction_cache.json. All cache data lives in a temp dir, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import diskcache
import joblib
import orjson
from datasets import Dataset
from datasets.fingerprint import Hasher
from machine import machine  # benchmarks/machine.py
from sqlitedict import SqliteDict
from stats import interleaved, summary, timed  # benchmarks/stats.py: one percentile for every table

from hf_cachehooks import CacheConfig
from hf_cachehooks._core import (
    entry,  # its parsed-entry memo, cleared to time a first read
    fingerprint,  # its memo of null-free rows, cleared to time a first call
)
from hf_cachehooks._core.fingerprint import example_hashes, fingerprint_data
from hf_cachehooks._core.keys import make_key
from hf_cachehooks.evaluation.predictions import PredictionCache

LIBRARIES = ("hf_cachehooks", "orjson", "xxhash", "joblib", "diskcache", "sqlitedict", "datasets", "pyarrow")

RESULTS = Path(__file__).resolve().parent / "results" / "bench_prediction_cache.json"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
WORDS = (
    "the of and to in is that for it as with was on be by at this are from or an which "
    "energy cell market theorem protein court vector species contract frequency"
).split()
rng = random.Random(0)


def text(n_chars: int) -> str:
    """Random words, cut to `n_chars`: realistic, incompressible-enough strings."""
    return " ".join(rng.choices(WORDS, k=n_chars // 4))[:n_chars]


# 1. Whole-run hit ---------------------------------------------------------------------------------

PAYLOADS: dict[int, dict] = {}


def run_doc(n: int) -> dict:
    """What the joblib-cached function returns: the very doc our cache stores."""
    return PAYLOADS[n]


def bench_run_hit(tmp: Path, n: int, reps: int) -> dict:
    PAYLOADS[n] = {
        "metadata": {
            "model_name": MODEL,
            "dataset_size": n,
            "created_at": time.time(),
            "dataset": "cais/mmlu",
            "split": "test",
            "dataset_fingerprint": "rows:" + "ab" * 16,
            "generation": {"max_new_tokens": 64, "temperature": 0.0, "do_sample": False},
            "prompt_template": "Question: {question}\nAnswer:",
            "batch_size": 32,
            "device": "cuda:0",
            "dtype": "bfloat16",
            "duration_s": 812.4,
            "versions": {"transformers": "4.46.0", "torch": "2.4.1", "hf_cachehooks": "0.1.0"},
        },
        "predictions": [text(200) for _ in range(n)],
        "references": [rng.choice("ABCD") for _ in range(n)],
        "metrics": {"accuracy": 0.4213, "exact_match": 0.4011},
        "metric_versions": {"accuracy": "evaluate==0.4.3", "exact_match": "evaluate==0.4.3"},
    }
    key = make_key("predictions", {"model": MODEL, "dataset": f"mmlu-{n}", "gen": {"max_new_tokens": 64}})
    cache = PredictionCache(CacheConfig(folder=tmp / "predictions", max_age=timedelta(days=30)))
    cache.save_run(key, MODEL, PAYLOADS[n])
    cached = joblib.Memory(tmp / "joblib", verbose=0).cache(run_doc)
    cached(n)  # the miss that fills joblib's cache
    dc = diskcache.Cache(str(tmp / "diskcache"))
    memo = dc.memoize()(run_doc)
    memo(n)  # diskcache's memoize, filled
    dc.set("run", PAYLOADS[n])  # diskcache.get of the doc: its raw read path (pickle in SQLite or a file)
    plain_json, plain_pickle = tmp / "plain.json", tmp / "plain.pkl"
    plain_json.write_bytes(orjson.dumps(PAYLOADS[n]))
    plain_pickle.write_bytes(pickle.dumps(PAYLOADS[n], protocol=pickle.HIGHEST_PROTOCOL))

    assert cache.load_run(key, MODEL)["predictions"] == cached(n)["predictions"] == dc.get("run")["predictions"]
    first_path = str(cache.run_path(key, MODEL))
    shutil.copytree(tmp / "predictions", tmp / "predictions-repeat")  # the same entry, remembered apart
    repeat = PredictionCache(CacheConfig(folder=tmp / "predictions-repeat", max_age=timedelta(days=30)))

    def first_read() -> dict | None:  # what a new process pays: read, checksum and parse the entry
        entry._parsed.pop(first_path, None)
        return cache.load_run(key, MODEL)

    out = interleaved(
        {
            "ours": first_read,
            "ours_repeat": lambda: repeat.load_run(key, MODEL),  # a repeat in one process: one stat, then copies
            "joblib_memory": lambda: cached(n),
            "diskcache_memoize": lambda: memo(n),
            "diskcache_get": lambda: dc.get("run"),
            "orjson_file": lambda: orjson.loads(plain_json.read_bytes()),
            "pickle_file": lambda: pickle.loads(plain_pickle.read_bytes()),  # noqa: S301 (our own file, for timing)
        },
        reps,
    )
    dc.close()
    size = cache.run_path(key, MODEL).stat().st_size
    return {"n": n, "entry_bytes": size, **out}


# 2. Fingerprinting -------------------------------------------------------------------------------


def bench_fingerprint(n: int, reps: int) -> dict:
    rows = [
        {
            "question": text(300),
            "choices": [text(40) for _ in range(4)],
            "answer": rng.randrange(4),
            "subject": rng.choice(["anatomy", "law", "virology"]),
        }
        for _ in range(n)
    ]
    start = time.perf_counter()
    ds = Dataset.from_list(rows)
    build_ms = (time.perf_counter() - start) * 1e3
    slow_reps = 2 if reps > 3 else 1
    return {
        "n": n,
        "ours_rows": summary(timed(lambda: fingerprint_data(rows), reps)),  # a repeat: rows seen free of null
        "ours_rows_first": summary(timed(lambda: fingerprint._null_free.clear() or fingerprint_data(rows), reps)),
        "joblib_hash": summary(timed(lambda: joblib.hash(rows), slow_reps)),
        "datasets_hasher": summary(timed(lambda: Hasher.hash(rows), slow_reps)),
        "ours_dataset": summary(timed(lambda: fingerprint_data(ds), 100)),
        "datasets_hasher_dataset": summary(timed(lambda: Hasher.hash(ds), slow_reps)),
        "dataset_from_list_ms": build_ms,  # one-off cost that computes ds._fingerprint, for context
    }


# 3. Resuming per-example entries ----------------------------------------------------------------


def bench_resume(tmp: Path, n: int, reps: int) -> dict:
    prompts = [f"Question {i}: " + text(300) for i in range(n)]
    hashes = example_hashes(prompts)
    preds = [text(200) for _ in range(n)]
    predictor = make_key(
        "examples",
        {"model": MODEL, "prompt": "Question: {question}\nAnswer:", "gen": {"max_new_tokens": 64, "temperature": 0}},
    )
    cache = PredictionCache(CacheConfig(folder=tmp / "predictions", max_age=timedelta(days=30)))

    def lookup_ours() -> None:
        rows = cache.load_examples(predictor)
        found = [rows[h] for h in hashes if h in rows]
        assert len(found) == n

    start = time.perf_counter()
    for i in range(0, n, 1000):
        cache.save_examples(predictor, dict(zip(hashes[i : i + 1000], preds[i : i + 1000])), f"shard-{i // 1000:05d}")
    save_ms = (time.perf_counter() - start) * 1e3
    lookup_ours()  # warm-up
    sharded = summary(timed(lookup_ours, reps))
    start = time.perf_counter()
    cache.compact(predictor)
    compact_ms = (time.perf_counter() - start) * 1e3
    lookup_ours()
    compacted = summary(timed(lookup_ours, reps))

    db_path = str(tmp / "lm_eval_cache.db")
    start = time.perf_counter()
    with SqliteDict(db_path, autocommit=False) as db:  # one commit: only the lookup is compared
        for h, p in zip(hashes, preds):
            db[h] = p
        db.commit()
    fill_ms = (time.perf_counter() - start) * 1e3

    def lookup_sqlitedict() -> None:
        db = SqliteDict(db_path, autocommit=True)  # as lm-eval's CachingLM opens it
        found = [db[h] for h in hashes if h in db]
        db.close()
        assert len(found) == n

    lookup_sqlitedict()  # warm-up
    alt = summary(timed(lookup_sqlitedict, max(1, reps // 2)))

    dc = diskcache.Cache(str(tmp / "diskcache"))  # the strongest key-value peer: one get per example
    start = time.perf_counter()
    for h, p in zip(hashes, preds):
        dc.set(h, p)
    dc_fill_ms = (time.perf_counter() - start) * 1e3

    def lookup_diskcache() -> None:
        found = [v for h in hashes if (v := dc.get(h)) is not None]
        assert len(found) == n

    lookup_diskcache()
    dc_times = summary(timed(lookup_diskcache, max(1, reps // 2)))
    dc.close()
    return {
        "n": n,
        "shards": -(-n // 1000),
        "ours_save_shards_ms": save_ms,
        "ours_compact_ms": compact_ms,
        "ours_100_shards": sharded,
        "ours_compacted": compacted,
        "sqlitedict_fill_ms": fill_ms,
        "sqlitedict": alt,
        "diskcache_fill_ms": dc_fill_ms,
        "diskcache": dc_times,
    }


# Report ------------------------------------------------------------------------------------------


def num(value: float | None) -> str:
    """Readable figures: 0.000251, 0.194, 55.4, 2,757."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k rows instead of 100k, fewer repetitions")
    args = parser.parse_args()
    n_big, reps_hit, reps_slow = (10_000, 20, 3) if args.quick else (100_000, 100, 5)

    tmp = Path(tempfile.mkdtemp(prefix="bench_prediction_cache_"))
    try:
        hit_1k = bench_run_hit(tmp / "hit1k", 1_000, reps_hit)
        hit_10k = bench_run_hit(tmp / "hit10k", 10_000, max(reps_hit // 2, 20 if args.quick else 50))
        fp = bench_fingerprint(n_big, reps_slow)
        resume = bench_resume(tmp / "resume", n_big, reps_slow)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    k = f"{n_big // 1000}k"
    rows = [  # name, ours, alternative, target for ours (ms)
        *[
            (
                f"run hit {h['n'] // 1000}k, median (vs {peer})",
                h["ours"]["median_ms"],
                h[peer]["median_ms"],
                1 if h["n"] == 1000 else 10,
            )
            for h in (hit_1k, hit_10k)
            for peer in ("joblib_memory", "diskcache_memoize", "diskcache_get", "orjson_file", "pickle_file")
        ],
        ("run hit 1k, p99 (vs diskcache.get)", hit_1k["ours"]["p99_ms"], hit_1k["diskcache_get"]["p99_ms"], None),
        *[
            (
                f"run hit {h['n'] // 1000}k repeated in one process (vs orjson_file)",
                h["ours_repeat"]["median_ms"],
                h["orjson_file"]["median_ms"],
                None,
            )
            for h in (hit_1k, hit_10k)
        ],
        (f"fingerprint {k} rows (vs joblib.hash)", fp["ours_rows"]["median_ms"], fp["joblib_hash"]["median_ms"], 100),
        (
            f"fingerprint {k} rows, first call (vs joblib.hash)",
            fp["ours_rows_first"]["median_ms"],
            fp["joblib_hash"]["median_ms"],
            100,
        ),
        (
            f"fingerprint {k} rows (vs datasets Hasher)",
            fp["ours_rows"]["median_ms"],
            fp["datasets_hasher"]["median_ms"],
            100,
        ),
        (
            f"fingerprint {k} Dataset (vs Hasher on it)",
            fp["ours_dataset"]["median_ms"],
            fp["datasets_hasher_dataset"]["median_ms"],
            100,
        ),
        (
            f"resume {k}, {resume['shards']} shards (vs SqliteDict)",
            resume["ours_100_shards"]["median_ms"],
            resume["sqlitedict"]["median_ms"],
            1500,
        ),
        (
            f"resume {k}, compacted (vs SqliteDict)",
            resume["ours_compacted"]["median_ms"],
            resume["sqlitedict"]["median_ms"],
            1500,
        ),
        (
            f"resume {k}, compacted (vs diskcache.get)",
            resume["ours_compacted"]["median_ms"],
            resume["diskcache"]["median_ms"],
            1500,
        ),
    ]
    table = [
        {
            "name": name,
            "ours_ms": ours,
            "alternative_ms": alt,
            "ratio_alt_over_ours": alt / ours if alt is not None else None,
            "target_ms": target,
            "meets_target": ours <= target if target is not None else None,
        }
        for name, ours, alt, target in rows
    ]

    print(f"\n{'benchmark':<50} {'ours ms':>9} {'alt ms':>9} {'alt/ours':>9}  target")
    for row in table:
        ratio = "-" if row["ratio_alt_over_ours"] is None else num(row["ratio_alt_over_ours"]) + "x"
        target = (
            ""
            if row["target_ms"] is None
            else f"<= {row['target_ms']:g} ms {'ok' if row['meets_target'] else 'MISSED'}"
        )
        print(f"{row['name']:<50} {num(row['ours_ms']):>9} {num(row['alternative_ms']):>9} {ratio:>9}  {target}")
    print(
        f"(Dataset.from_list({n_big}) took {fp['dataset_from_list_ms']:.0f} ms, which computes _fingerprint; "
        f"save {resume['shards']} shards {resume['ours_save_shards_ms']:.0f} ms, compact "
        f"{resume['ours_compact_ms']:.0f} ms, SqliteDict fill {resume['sqlitedict_fill_ms']:.0f} ms)"
    )

    out_path = RESULTS.with_name(RESULTS.stem + "_quick.json") if args.quick else RESULTS  # keep full figures
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(
        json.dumps(
            {
                "quick": args.quick,
                "machine": machine(LIBRARIES),
                "table": table,
                "run_hit": [hit_1k, hit_10k],
                "fingerprint": fp,
                "resume": resume,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"Wrote {out_path}")


if __name__ == "__main__":
    main()
