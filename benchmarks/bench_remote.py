"""Benchmark cache roots on S3 against a local root, side by side in one run, on a loopback S3 server.

Three payloads, each read through the library's own code path from three roots:

- local:   a local cache root (what every cache did before remote roots).
- S3 cold: an `s3://` root read by a machine whose local copy is empty: the manifest and every file it
           lists are fetched, checked for size and xxh3, then served from the new local copy.
- S3 warm: the same `s3://` root read again: one HEAD of the manifest (its ETag is unchanged), then the
           local copy is served as a local root would be.

Payloads: a generation entry (GenerationCache.generate hit, 2,000 completions), a prediction run entry
(PredictionCache.load_run hit, 2,000 predictions) and an activation store (20,000 rows x 2 layers x 768
float16, 61 MB: `ActivationStore(url).layer(L)` for both layers; read throughput in MB/s of payload).
Bytes transferred per hit count every byte the S3 client received (GET bodies); requests count every call.

The server is moto's ThreadedMotoServer on 127.0.0.1 (no network, no account): its latency is a loopback
HTTP round trip plus moto's Python request handling, so S3 figures are a floor for a real store's
request count and bytes, not for its latency. torch.set_num_threads(1).

    . .venv/bin/activate && pip install -e '.[remote,activations,test]'
    python benchmarks/bench_remote.py            # ~1 minute
    python benchmarks/bench_remote.py --quick    # smaller payloads

It prints a table and writes every figure, with machine info, to benchmarks/results/bench_remote.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from machine import machine  # benchmarks/machine.py

from hf_cachehooks import ActivationStore, CacheConfig, GenerationCache
from hf_cachehooks._core.keys import make_key
from hf_cachehooks._core.remote import filesystem
from hf_cachehooks._models.extraction import Pooled
from hf_cachehooks.activations.writer import arrow_table, finish_store, write_chunk
from hf_cachehooks.evaluation.predictions import PredictionCache

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "bench_remote.json"
LIBRARIES = ("hf_cachehooks", "fsspec", "s3fs", "moto", "pyarrow", "torch")
SETTINGS = {"prompt_name": "bench", "subject_type": "all", "temperature": 1.0, "max_tokens": 64}


class Counter:
    """Wraps the s3fs instance the library uses: requests made and body bytes received."""

    def __init__(self, fs) -> None:
        self.requests = 0
        self.received = 0
        for name in ("info", "cat_file", "get_file", "ls", "find", "put_file", "pipe_file", "rm_file"):
            real = getattr(fs, name)
            setattr(fs, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def call(*args, **kwargs):
            self.requests += 1
            out = real(*args, **kwargs)
            if name == "cat_file":
                self.received += len(out)
            elif name == "get_file":
                self.received += os.path.getsize(args[1])
            return out

        return call

    def take(self) -> tuple[int, int]:
        got = (self.requests, self.received)
        self.requests = self.received = 0
        return got


class Echo:
    name = "echo"

    def render(self, prompts):
        return list(prompts)

    def complete(self, prompts, sampling):
        return [f"{p} " + "lorem ipsum " * 16 for p in prompts]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def three_ways(name: str, url: str, local: str, read, reps: int, copies: Path, counter: Counter, mb: float = 0.0):
    """ms per read from the local root, from S3 with an empty local copy (cold), and from S3 again (warm)."""
    row = {"payload": name}
    row["local_ms"] = statistics.median(timed(lambda: read(local)) for _ in range(reps))
    cold, cold_bytes, cold_requests = [], [], []
    for rep in range(max(3, reps // 4)):
        os.environ["HF_CACHEHOOKS_LOCAL_COPY"] = str(copies / f"{name}-cold-{rep}")
        counter.take()
        cold.append(timed(lambda: read(url)))
        requests, received = counter.take()
        cold_requests.append(requests)
        cold_bytes.append(received)
    warm = [timed(lambda: read(url)) for _ in range(reps)]
    requests, received = counter.take()
    row.update(
        s3_cold_ms=statistics.median(cold),
        s3_warm_ms=statistics.median(warm),
        cold_bytes_per_hit=statistics.median(cold_bytes),
        cold_requests_per_hit=statistics.median(cold_requests),
        warm_bytes_per_hit=received / reps,
        warm_requests_per_hit=requests / reps,
    )
    row["warm_vs_local"] = row["s3_warm_ms"] / row["local_ms"]
    row["cold_vs_local"] = row["s3_cold_ms"] / row["local_ms"]
    if mb:
        row.update(
            payload_mb=mb,
            local_mb_s=mb / row["local_ms"] * 1e3,
            s3_cold_mb_s=mb / row["s3_cold_ms"] * 1e3,
            s3_warm_mb_s=mb / row["s3_warm_ms"] * 1e3,
        )
    return row


def write_store(folder: Path, rows: int, layers: list[int], hidden: int, shard: int = 4096) -> None:
    """`cache_activations` minus the model: the writer's own `arrow_table`/`write_chunk`/`finish_store`."""
    rng = np.random.default_rng(0)
    arrays = {L: rng.standard_normal((rows, hidden)).astype(np.float16) for L in layers}
    labels = [{"label": int(i % 2)} for i in range(rows)]
    key = make_key("activations", {"model": {"name": "bench/synthetic"}, "n": rows, "layers": layers})
    chunks = [(c, s, min(rows, s + shard)) for c, s in enumerate(range(0, rows, shard))]
    for c, s, e in chunks:
        pooled = [(Pooled({L: torch.from_numpy(arrays[L][s:e]) for L in layers}, torch.arange(e - s)), 0)]
        write_chunk(folder, c, s, e, arrow_table(pooled, s, labels, ["label"], layers, "float16", hidden), key, shard)
    finish_store(folder, chunks, labels, ["label"], "label", key, layers, "last", "float16", hidden, shard)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller payloads and fewer repetitions")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    n, rows, reps = (500, 4096, 8) if args.quick else (2000, 20_000, 20)
    tmp = Path(tempfile.mkdtemp(prefix="bench_remote_"))
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    fs = filesystem(f"s3://{bucket}")[0]
    fs.mkdir(bucket)
    url, local, copies = f"s3://{bucket}/cache", str(tmp / "local"), tmp / "copies"
    os.environ["HF_CACHEHOOKS_LOCAL_COPY"] = str(copies / "writer")
    results = []
    try:
        prompts = [f"question {i} ?" for i in range(n)]
        for root in (local, url):
            GenerationCache("bench/model", cache=CacheConfig(root=root)).generate(prompts, Echo(), **SETTINGS)
        counter = Counter(fs)

        def generations(root: str) -> None:
            assert (
                GenerationCache("bench/model", cache=CacheConfig(root=root))
                .generate(prompts, Echo(), **SETTINGS)
                .status
                == "hit"
            )

        results.append(three_ways("generations", url, local, generations, reps, copies, counter))

        key = make_key("predictions", {"bench": n})
        doc = {
            "metadata": {"model_name": "bench/model", "created_at": time.time()},
            "metrics": {"exact_match": 0.5},
            "predictions": [f"answer {i}" for i in range(n)],
            "references": [f"ref {i}" for i in range(n)],
        }
        for root in (local, url):
            PredictionCache(CacheConfig(root=root, max_age=None)).save_run(key, "m", doc)

        def predictions(root: str) -> None:
            cache = PredictionCache(CacheConfig(root=root, max_age=None))
            found = cache.load_run(key, "m")
            assert found is not None and len(found["predictions"]) == n

        results.append(three_ways("predictions", url, local, predictions, reps, copies, counter))

        layers, hidden = [10, 20], 768
        write_store(Path(local) / "activations" / "run1", rows, layers, hidden)
        os.environ["HF_CACHEHOOKS_LOCAL_COPY"] = str(copies / "writer")
        store_url = f"{url}/activations/run1"
        started = time.perf_counter()
        write_store(Path(CacheConfig(root=store_url).resolve_root()), rows, layers, hidden)  # uploads when finished
        upload_s = time.perf_counter() - started
        counter.take()
        mb = rows * len(layers) * hidden * 2 / 1e6

        def activations(root: str) -> None:
            store = ActivationStore(root if root.startswith("s3://") else f"{root}/activations/run1")
            for layer in layers:
                assert store.layer(layer).shape == (rows, hidden)

        results.append(three_ways("activations", store_url, local, activations, max(4, reps // 2), copies, counter, mb))
        results[-1]["write_and_upload_s"] = upload_s
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        server.stop()

    print(
        f"{'payload':<12} {'local ms':>9} {'S3 warm ms':>11} {'S3 cold ms':>11} {'warm/local':>10} "
        f"{'warm B/hit':>10} {'warm req':>8} {'cold B/hit':>11} {'cold req':>8}"
    )
    for r in results:
        print(
            f"{r['payload']:<12} {r['local_ms']:>9.2f} {r['s3_warm_ms']:>11.2f} {r['s3_cold_ms']:>11.2f} "
            f"{r['warm_vs_local']:>9.2f}x {r['warm_bytes_per_hit']:>10.0f} {r['warm_requests_per_hit']:>8.1f} "
            f"{r['cold_bytes_per_hit']:>11.0f} {r['cold_requests_per_hit']:>8.0f}"
        )
        if "payload_mb" in r:
            print(
                f"{'':<12} read MB/s: local {r['local_mb_s']:.0f}, S3 warm {r['s3_warm_mb_s']:.0f}, "
                f"S3 cold {r['s3_cold_mb_s']:.0f} ({r['payload_mb']:.0f} MB payload)"
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "quick": args.quick,
                "examples": n,
                "store_rows": rows,
                "reps": reps,
                "results": results,
                "machine": machine(LIBRARIES),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
