"""ls, du and prune over a root of 10,000 entries, beside huggingface_hub's `scan_cache_dir` on a Hub cache of
10,000 files, and beside an earlier tree's management on the very same root.

1. A cache root of 10,000 entries of every kind, made through `entry.commit` (fsync switched off while
   building: the bytes are the same), in realistic proportions and sizes: per-example prediction shards,
   prediction runs whose manifests are longer than the head, generations, conversations (some touched by
   reads), activation stores with their shards, identity and file-hash memos, last-miss records.
2. `management.list_entries` (ls, memos included), `disk_usage` (du) and `plan_prune` (prune planning),
   each the median (nearest rank, `benchmarks/stats.py`) of round-robin repetitions; then executing the
   prune plan once, on a copy of the root.
3. `huggingface_hub.scan_cache_dir` on a Hub cache laid out by hand as the Hub writes it
   (`models--org--name/{blobs,snapshots/<commit>/...,refs/main}`, each snapshot file a relative symlink to
   its blob): 100 repos of 100 files, 10,000 cached files in all.
4. With `--before REF` (default HEAD, the tree before the summary), that tree's ls, du and prune on the
   same root, once each in a subprocess (it parses every manifest whole and stats every file).

Run it from the repository root (OMP_NUM_THREADS=1; no model, no network; about a minute, plus the
earlier tree's):

    . .venv/bin/activate
    OMP_NUM_THREADS=1 python benchmarks/bench_management.py
    OMP_NUM_THREADS=1 python benchmarks/bench_management.py --entries 2000 --before none

It prints a table and writes benchmarks/results/management.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # benchmarks/machine.py
from stats import interleaved, summary, timed  # benchmarks/stats.py: the one percentile

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "management.json"
sys.path.insert(0, str(REPO))

from hf_cachehooks import management  # noqa: E402
from hf_cachehooks._core import entry, store  # noqa: E402
from hf_cachehooks._core.keys import make_key  # noqa: E402

DAY = 86400.0
# kind -> share of the entries (sums to 1)
MIX = {
    "example-predictions": 0.45,
    "predictions": 0.05,
    "generations": 0.15,
    "conversation": 0.15,
    "activations": 0.02,
    "identity": 0.12,
    "file-hashes": 0.03,
    "last-miss": 0.03,
}

_TOPS = ("activations", "conversations", "experiments", "identity", "predictions")  # the folders caches tag

OLD_WORKER = r"""
import json, sys, time
from pathlib import Path
from hf_cachehooks import management
root, figures = Path(sys.argv[1]), {}
for name, fn in [("ls", lambda: management.list_entries(root, bookkeeping=True)),
                 ("du", lambda: management.disk_usage(root)),
                 ("prune", lambda: management.plan_prune(root, 30 * 86400))]:
    start = time.perf_counter()
    fn()
    figures[name] = (time.perf_counter() - start) * 1e3
print(json.dumps(figures))
"""


def _model(i: int) -> dict:
    return {"name": f"org/model-{i % 7}", "params": f"{i % 7:032x}"}


def _entry(root: Path, kind: str, i: int, now: float) -> None:
    """One entry of `kind`, as its cache writes it (fields and file sizes alike)."""
    created = now - (i % 60) * DAY
    files: dict[str, dict] = {}
    if kind == "example-predictions":
        folder = root / "predictions" / "examples" / f"{i % 50:016x}"
        path, key = folder / f"b{i:06d}.json", make_key("predictor", {"model": _model(i)})
        fields: dict = {"rows": {f"{i:08x}{j:024x}": f"answer {j}" for j in range(16)}}
    elif kind == "predictions":
        folder = root / "predictions"
        path, key = folder / f"model_{i:06d}.json", make_key("predictions", {"model": _model(i), "i": i})
        n = 120
        fields = {
            "metadata": {"model_name": _model(i)["name"], "dataset_size": n, "created_at": created},
            "predictions": [f"prediction {j}" for j in range(n)],
            "references": [f"ref {j}" for j in range(n)],
            "metrics": {"exact_match": 0.5},
        }
    elif kind == "generations":
        folder = root / "experiments" / f"model-{i % 7}" / f"prompt-{i % 40}" / f"run-{i}"
        path, key = folder / "n20_metadata.json", make_key("generations", {"model": f"model-{i % 7}", "i": i})
        folder.mkdir(parents=True, exist_ok=True)
        files = {f"n20{s}": entry.write_file(folder, f"n20{s}", os.urandom(3000)) for s in (".jsonl", "_raw.jsonl")}
        fields = {"model": _model(i)["name"], "num_samples": 20, "num_rows": 20}
    elif kind == "conversation":
        folder = root / "conversations" / f"conv-{i:06d}"
        path = folder / "conversation.json"
        key = {"kind": "conversation", "digest": f"{i:032x}", "inputs": {"conv_id": folder.name, "uid": f"{i:032x}"}}
        folder.mkdir(parents=True, exist_ok=True)
        files = {f"turn-{t}.bin": entry.write_file(folder, f"turn-{t}.bin", os.urandom(8000)) for t in range(2)}
        fields = {
            "conv_id": folder.name,
            "tokens": 200,
            "pinned": i % 50 == 0,
            "meta": {},
            "last_access": created,
            "turns": [{"start": t * 100, "count": 100, "file": f"turn-{t}.bin"} for t in range(2)],
        }
        if i % 3 == 0:  # read since: the touch file's mtime is its last use
            (folder / ".last_access").write_bytes(b"")
    elif kind == "activations":
        folder = root / "activations" / f"store-{i:05d}"
        path, key = folder / "manifest.json", make_key("activations", {"model": _model(i), "i": i})
        store.tag_folder(folder)
        names = [f"data-{c:05d}.arrow" for c in range(4)]
        files = {name: entry.write_file(folder, name, os.urandom(20000)) for name in names}
        fields = {
            "layers": [1, 2],
            "num_examples": 64,
            "hidden_size": 8,
            "dtype": "float16",
            "positions": "last",
            "chunks": [{"file": name, "rows": 16, "offsets": {}} for name in names],
        }
    elif kind == "identity":
        folder = root / "identity"
        path, key = folder / f"org_model_{i:06d}.json", {"kind": "identity", "digest": f"{i:032x}", "inputs": {}}
        fields = {"identity": {"model": _model(i), "config": {"hidden": 8}}}
    elif kind == "file-hashes":
        folder = root / "identity" / "hashes"
        path, key = folder / f"memo-{i}.json", {"kind": "file-hashes", "digest": f"{i:032x}", "inputs": {}}
        fields = {"hashes": {f"/data/file-{j}": f"{j:032x}" for j in range(20)}}
    else:
        folder = root / "predictions" / "misses" / f"m{i}"
        path, key = folder / "last_miss.json", make_key("predictions", {"model": _model(i), "i": i})
        fields = {"reason": "no earlier entry in this cache", "closest": None, "changes": [], "timestamp": created}
    folder.mkdir(parents=True, exist_ok=True)  # each cache tags its top folder (a store its own), as in `_TOPS`
    assert entry.commit(path, kind, key, files, fields, created_at=created)


def build_root(root: Path, entries: int, now: float) -> dict[str, int]:
    """A tagged root of `entries` entries in the proportions of `MIX`; returns the count per kind."""
    fsync = os.fsync
    os.fsync = lambda fd: None  # building only: the same bytes land, without waiting for the disk 10k times
    counts: dict[str, int] = {}
    try:
        for top in _TOPS:
            store.tag_folder(root / top)
        i = 0
        for kind, share in MIX.items():
            counts[kind] = round(entries * share) if kind != "last-miss" else entries - i
            for _ in range(counts[kind]):
                _entry(root, kind, i, now)
                i += 1
    finally:
        os.fsync = fsync
    return counts


def build_hub(cache: Path, files: int, per_repo: int = 100) -> None:
    """A Hub cache laid out as huggingface_hub writes it: blobs, a snapshot of links to them, refs/main."""
    for r in range(files // per_repo):
        repo = cache / f"models--org--model-{r}"
        commit = f"{r:040x}"
        (repo / "blobs").mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        snapshot = repo / "snapshots" / commit
        for f in range(per_repo):
            blob = f"{r:020x}{f:020x}"
            (repo / "blobs" / blob).write_bytes(b"x" * (1000 + f))
            name = snapshot / ("model.safetensors" if f == 0 else f"shard/{f // 10}/file-{f}.json")
            name.parent.mkdir(parents=True, exist_ok=True)
            name.symlink_to(os.path.relpath(repo / "blobs" / blob, name.parent))


def before(ref: str, root: Path, work: Path) -> dict[str, float]:
    """That tree's ls, du and prune planning on the same root, once each (ms)."""
    tree = work / "before"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "hf_cachehooks"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", OLD_WORKER, str(root)], env=env, check=True, capture_output=True, text=True, cwd=work
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--before", default="HEAD", help="git ref of an earlier tree to time too, or 'none'")
    args = parser.parse_args()
    from huggingface_hub import scan_cache_dir

    work = Path(tempfile.mkdtemp(prefix="bench-management-"))
    try:
        root, hub, now = work / "cache", work / "hub", time.time()
        start = time.perf_counter()
        counts = build_root(root, args.entries, now)
        build_hub(hub, args.entries)
        built_s = time.perf_counter() - start
        listed = len(management.list_entries(root, bookkeeping=True))
        planned = len(management.plan_prune(root, 30 * DAY).entries)
        hub_files = scan_cache_dir(hub).repos
        assert listed == args.entries, (listed, args.entries)
        figures = interleaved(
            {
                "ls": lambda: management.list_entries(root, bookkeeping=True),
                "du": lambda: management.disk_usage(root),
                "prune (plan)": lambda: management.plan_prune(root, 30 * DAY),
                "hf_hub scan_cache_dir": lambda: scan_cache_dir(hub),
            },
            args.reps,
        )
        copy = work / "copy"
        shutil.copytree(root, copy, symlinks=True)
        plan = management.plan_prune(copy, 30 * DAY)
        figures["prune (execute, once)"] = summary(timed(plan.execute, 1))
        old = before(args.before, root, work) if args.before != "none" else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    hub_ms = figures["hf_hub scan_cache_dir"]["median_ms"]
    print(
        f"{args.entries} entries ({', '.join(f'{k} {v}' for k, v in counts.items())}); built in {built_s:.0f} s; "
        f"hub cache: {len(hub_files)} repos, {sum(r.nb_files for r in hub_files)} files"
    )
    header = f"{'operation':<24} {'median ms':>10} {'p99 ms':>9} {'vs hf_hub':>10}"
    print(header + (f" {'before ms':>10}" if old else ""))
    for name, row in figures.items():
        earlier = old.get(name.split(" ")[0]) if "execute" not in name else None
        print(
            f"{name:<24} {row['median_ms']:>10.0f} {row['p99_ms']:>9.0f} {row['median_ms'] / hub_ms:>9.2f}x"
            + (f" {earlier:>10.0f}" if earlier is not None else "")
        )
    print(f"prune plan: {planned} of {listed} entries older than 30 days (pinned conversations kept)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "entries": args.entries,
                "kinds": counts,
                "hub_files": sum(r.nb_files for r in hub_files),
                "reps": args.reps,
                "threads": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
                "figures": figures,
                "ratio_to_hf_hub": {name: row["median_ms"] / hub_ms for name, row in figures.items()},
                "before": {"ref": args.before, "ms": old},
                "pruned": planned,
                "machine": machine(["huggingface_hub"]),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
