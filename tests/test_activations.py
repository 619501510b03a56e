"""Activation extraction and store: layer semantics, positions, dtypes, views, errors, resume, two processes."""

import json
import os
from datetime import timedelta

import numpy as np
import pytest
import torch

import hf_cachehooks.activations.shards as shards
import hf_cachehooks.activations.writer as writer
from hf_cachehooks import CacheConfig
from hf_cachehooks._models.extraction import batches, capture, pool
from hf_cachehooks.activations.store import ActivationStore, verify_store
from hf_cachehooks.activations.writer import cache_activations
from hf_cachehooks.errors import ConfigError
from tests.conftest import make_llama, make_tokenizer

WORDS = "what is the capital of france ? paris two plus four yes no blue red green sky".split()


def records(n=21):
    return [
        {
            "text": " ".join(WORDS[(i * 3) % 7 : (i * 3) % 7 + 1 + i % 6]),
            "type": "testing" if i % 3 else "deployment",
            "id": i,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def llama():
    return make_llama(layers=3), make_tokenizer()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, bos_token_id=1, eos_token_id=2)
    ).eval()


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(
        BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=64)
    ).eval()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("which", ["llama", "gpt2", "bert"])
def test_layer_l_equals_output_hidden_states_l(llama, side, which):
    model = {"llama": lambda: llama[0], "gpt2": _gpt2, "bert": _bert}[which]()
    tok = make_tokenizer()
    tok.padding_side = side
    _, batch = next(batches(["what is the capital of france ?", "yes", "two plus"], tok, 3))
    reference = model(**batch, output_hidden_states=True).hidden_states
    n = len(reference) - 1
    got = capture(model, batch, list(range(n + 1)))
    for layer in range(n + 1):
        assert torch.allclose(got[layer], reference[layer], atol=1e-6), f"layer {layer}"


def test_forward_stops_after_the_deepest_layer(llama):
    model, tok = llama
    reached = []
    handle = model.model.layers[2].register_forward_pre_hook(lambda m, a: reached.append(1))
    try:
        _, batch = next(batches(["yes no"], tok, 1))
        capture(model, batch, [1])
    finally:
        handle.remove()
    assert reached == []  # block 2 never ran


@pytest.mark.parametrize("side", ["left", "right"])
def test_every_position_mode(llama, side):
    model, tok = llama
    tok.padding_side = side
    texts = ["what is the capital of france ?", "yes", "two plus four"]
    _, batch = next(batches(texts, tok, 3))
    full = model(**batch, output_hidden_states=True).hidden_states[2]  # (batch, seq, hidden)
    mask = batch["attention_mask"].bool()
    got = capture(model, batch, [2])
    real = [full[i][mask[i]] for i in range(3)]  # each example's real tokens, in order
    last, first = (
        pool(got, batch["attention_mask"], batch["input_ids"], "last"),
        pool(got, batch["attention_mask"], batch["input_ids"], "first"),
    )
    mean = pool(got, batch["attention_mask"], batch["input_ids"], "mean")
    every = pool(got, batch["attention_mask"], batch["input_ids"], "all")
    for i in range(3):
        assert torch.allclose(last.layers[2][i], real[i][-1], atol=1e-6)
        assert torch.allclose(first.layers[2][i], real[i][0], atol=1e-6)
        assert torch.allclose(mean.layers[2][i], real[i].mean(0), atol=1e-5)
    assert torch.allclose(every.layers[2], torch.cat(real), atol=1e-6)
    assert every.position.tolist() == [p for r in real for p in range(len(r))]
    assert every.token_id.tolist() == batch["input_ids"][mask].tolist()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dtype_round_trip_is_bit_exact(llama, tmp_path, dtype):
    model, tok = llama
    rows = records()
    store = cache_activations(
        model, tok, rows, tmp_path / dtype, [1, 3], dtype=dtype, batch_size=4, shard_size=8, progress=False
    )
    assert store.layer(3).dtype == getattr(torch, dtype) and store.layer(3).shape == (len(rows), 16)
    tok.padding_side = "right"
    expected = []
    for _, batch in batches([r["text"] for r in rows], tok, 4):
        pooled = pool(capture(model, batch, [3]), batch["attention_mask"], batch["input_ids"], "last")
        expected.append(pooled.layers[3].to(getattr(torch, dtype)))
    assert torch.equal(store.layer(3), torch.cat(expected))
    if dtype == "bfloat16":  # Arrow has no bf16: its bits are kept, never widened to float32
        assert store.numpy(3).dtype == np.uint16
        assert (tmp_path / dtype / "data-00000.arrow").stat().st_size < len(rows) * 16 * 2 * 2 + 4096


def test_store_layout_fields_and_datasets_compatibility(llama, tmp_path):
    model, tok = llama
    store = cache_activations(model, tok, records(), tmp_path / "c", [1, 2], progress=False, shard_size=8)
    info = json.loads((tmp_path / "c" / "layer_info.json").read_text())  # the integrity check users run
    assert info["layers"] == [1, 2] and info["num_examples"] == 21
    meta = json.loads((tmp_path / "c" / "metadata.json").read_text())  # per-example values are columns, once
    assert meta["fields"] == ["text", "type", "id"] and meta["label_counts"] == {"deployment": 7, "testing": 14}
    assert "examples" not in meta
    assert store.column("type") == [r["type"] for r in records()]
    assert store.column("example_index") == list(range(21))  # a pooled row i is example i: not stored
    ds = store.to_dataset()
    assert ds.num_rows == 21 and "layer_2" in ds.column_names and ds[3]["id"] == 3
    assert ds.features["id"].dtype == "int8" and "example_index" not in ds.column_names
    assert np.allclose(np.array(ds[5]["layer_2"], dtype=np.float32), store.numpy(2)[5].astype(np.float32))
    assert store.info()["chunks"] == 3 and store.info()["dtype"] == "float16"


def test_subset_is_a_view(llama, tmp_path):
    model, tok = llama
    store = cache_activations(model, tok, records(), tmp_path / "c", [2], progress=False, shard_size=8)
    before = sorted((p.name, p.stat().st_size) for p in (tmp_path / "c").iterdir())
    idx = [20, 3, 9, 9, 0]
    view = store.select(idx)
    assert torch.equal(view.layer(2), store.layer(2)[idx]) and len(view) == 5
    assert torch.equal(view.select([1, 4]).layer(2), store.layer(2)[[3, 0]])
    assert view.column("id") == idx
    assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "c").iterdir()) == before  # nothing rewritten
    with pytest.raises(ConfigError, match="0..20"):
        store.select([21])


def test_missing_layer_names_the_cached_ones(llama, tmp_path):
    model, tok = llama
    store = cache_activations(model, tok, records(), tmp_path / "c", [1, 3], progress=False)
    missing = r"Layer 2 is not in this cache \(cached: 1, 3\)\. Re-run cache_activations with layers= including 2"
    with pytest.raises(ConfigError, match=missing):
        store.layer(2)
    with pytest.raises(ConfigError, match="0..3"):
        cache_activations(model, tok, records(), tmp_path / "d", [4], progress=False)
    with pytest.raises(ConfigError, match="no finished activation cache"):
        ActivationStore(tmp_path / "nothing")


def test_other_inputs_in_the_same_folder_are_refused(llama, tmp_path):
    model, tok = llama
    cache_activations(model, tok, records(), tmp_path / "c", [1], progress=False)
    with pytest.raises(ConfigError, match="positions"):
        cache_activations(model, tok, records(), tmp_path / "c", [1], positions="mean", progress=False)
    store = cache_activations(model, tok, records(), tmp_path / "c", [1], positions="mean", force=True, progress=False)
    assert store.positions == "mean"


def test_batch_size_and_shard_size_do_not_change_the_key(llama, tmp_path, monkeypatch):
    model, tok = llama
    first = cache_activations(model, tok, records(), tmp_path / "c", [1], batch_size=2, shard_size=8, progress=False)
    monkeypatch.setattr(writer, "capture", lambda *a, **k: pytest.fail("extracted again"))
    again = cache_activations(model, tok, records(), tmp_path / "c", [1], batch_size=7, shard_size=5, progress=False)
    assert torch.equal(again.layer(1), first.layer(1))


def _killed_after_three_batches(monkeypatch, batches=3):
    """Forward pass `batches` + 1 raises KeyboardInterrupt: with 3 batches of 4 in chunks of 8, chunk 0 is done and
    the run dies inside chunk 1. Returns the real `capture`."""
    real, calls = writer.capture, []

    def dying(*args, **kwargs):
        if len(calls) == batches:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "capture", dying)
    return real


def test_interrupted_run_resumes_from_complete_chunks(llama, tmp_path, monkeypatch):
    model, tok = llama
    clean = cache_activations(
        model, tok, records(), tmp_path / "clean", [2], shard_size=8, batch_size=4, progress=False
    )
    real = _killed_after_three_batches(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(model, tok, records(), tmp_path / "c", [2], shard_size=8, batch_size=4, progress=False)
    names = sorted(str(p.relative_to(tmp_path / "c")) for p in (tmp_path / "c").rglob("*"))
    assert names == [".chunks", ".chunks/data-00000.json", "CACHEDIR.TAG", "data-00000.arrow"]  # no partial chunk
    with pytest.raises(ConfigError):
        ActivationStore(tmp_path / "c")
    resumed_calls = []
    monkeypatch.setattr(writer, "capture", lambda *a, **k: resumed_calls.append(1) or real(*a, **k))
    store = cache_activations(model, tok, records(), tmp_path / "c", [2], shard_size=8, batch_size=4, progress=False)
    assert len(resumed_calls) == 4  # chunks 1 and 2 only (13 examples, batches of 4)
    assert torch.equal(store.layer(2), clean.layer(2))
    assert not (tmp_path / "c" / ".chunks").exists()  # bookkeeping gone once the manifest is in


def _rank_main(rank, world, init_file, folder):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, tok = make_llama(layers=3), make_tokenizer()
        cache_activations(model, tok, records(37), folder, [1, 3], shard_size=5, batch_size=3, progress=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_write_one_store_equal_to_a_single_process_store(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path / "multi")), nprocs=2, join=True)
    multi = ActivationStore(tmp_path / "multi")
    single = cache_activations(
        make_llama(layers=3), make_tokenizer(), records(37), tmp_path / "single", [1, 3], shard_size=5, progress=False
    )
    assert multi.manifest["key"]["digest"] == single.manifest["key"]["digest"]
    for layer in (1, 3):
        assert torch.equal(multi.layer(layer), single.layer(layer))
    assert multi.column("example_index") == list(range(37))
    # a store made by two processes is a hit for one (the key leaves out the process count)
    monkeypatch.setattr(writer, "capture", lambda *a, **k: pytest.fail("extracted again"))
    cache_activations(make_llama(layers=3), make_tokenizer(), records(37), tmp_path / "multi", [1, 3], progress=False)
    assert os.environ.get("WORLD_SIZE") is None


def test_contrastive_pairs_become_labelled_rows(llama, tmp_path):
    model, tok = llama
    pairs = [{"positive": "yes sky blue", "negative": "no sky red"}, {"positive": "paris", "negative": "two"}]
    store = cache_activations(model, tok, pairs, tmp_path / "p", [1], progress=False)
    assert store.column("label") == ["positive", "negative"] * 2 and store.column("pair") == [0, 0, 1, 1]


# The entry contract: a store that does not check out is never served -------------------------------------


def _extractions(monkeypatch):
    """Count forward passes from here on (a re-extraction runs them, a hit does not)."""
    calls = []
    real = writer.capture
    monkeypatch.setattr(writer, "capture", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _flip(path, at=-10):
    """Flip one byte in place, size and mtime restored (what `cp -p`/`rsync --inplace -t` or bit rot leave)."""
    st = os.stat(path)
    with open(path, "r+b") as handle:
        handle.seek(at, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _swap(a, b):
    tmp = a.with_name("swap.tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


DAMAGE = {
    "flipped byte": lambda d: _flip(d / "data-00001.arrow"),
    "swapped shards": lambda d: _swap(d / "data-00000.arrow", d / "data-00001.arrow"),
    "truncated": lambda d: os.truncate(d / "data-00002.arrow", 100),
    "garbage": lambda d: (d / "data-00001.arrow").write_bytes(os.urandom((d / "data-00001.arrow").stat().st_size)),
    "deleted": lambda d: (d / "data-00000.arrow").unlink(),
    "side file": lambda d: _flip(d / "metadata.json", -40),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_store_is_never_served_and_is_re_extracted(llama, tmp_path, monkeypatch, caplog, damage):
    model, tok = llama
    folder = tmp_path / "c"
    clean = cache_activations(model, tok, records(), folder, [2], shard_size=8, progress=False).layer(2)
    assert verify_store(folder) == []
    DAMAGE[damage](folder)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ConfigError, match="corrupt activation cache") as err:
        store = ActivationStore(folder)  # checks the manifest; each shard is checked as it is mapped
        store.layer(2)
        store.to_dataset()  # checks every file `datasets` reads
    assert "\n" not in str(err.value) and f"cache_activations with folder='{folder}'" in str(err.value)  # the fix
    assert sorted(p.name for p in folder.iterdir()) == before  # opening for reading deletes nothing
    assert len(verify_store(folder)) == 1
    calls = _extractions(monkeypatch)
    store = cache_activations(model, tok, records(), folder, [2], shard_size=8, progress=False)
    assert calls and "Corrupt activation cache" in caplog.text
    assert torch.equal(store.layer(2), clean) and store.column("id") == list(range(21))
    assert torch.equal(ActivationStore(folder, verify=True).layer(2), clean) and verify_store(folder) == []


def _synthetic_store(folder, rows=4096, hidden=128, chunks=2):
    """A store of `chunks` shards over 1 MiB each (so opening trusts stamps), without a model."""
    from hf_cachehooks._core.keys import make_key
    from hf_cachehooks._models.extraction import Pooled

    key = make_key("activations", {"model": {"name": "synthetic"}, "n": rows * chunks})
    data = torch.randn(rows * chunks, hidden)
    table_rows, spans = [{"label": i % 2} for i in range(rows * chunks)], []
    for c in range(chunks):
        start, end = c * rows, (c + 1) * rows
        pooled = [(Pooled({1: data[start:end]}, torch.arange(rows)), 0)]
        table = writer.arrow_table(pooled, start, table_rows, ["label"], [1], "float32", hidden)
        writer.write_chunk(folder, c, start, end, table, key, rows)
        spans.append((c, start, end))
    writer.finish_store(folder, spans, table_rows, ["label"], "label", key, [1], "last", "float32", hidden, rows)
    return data


def test_a_big_shard_rewritten_in_place_with_its_mtime_restored_is_refused(tmp_path, monkeypatch):
    import hf_cachehooks._core.entry as entry

    folder = tmp_path / "big"
    data = _synthetic_store(folder)
    assert (folder / "data-00001.arrow").stat().st_size > 1 << 20
    hashed = []
    real = entry.hash_file
    monkeypatch.setattr(entry, "hash_file", lambda p: hashed.append(os.path.basename(p)) or real(p))
    assert torch.equal(ActivationStore(folder).layer(1), data)
    assert not [name for name in hashed if name.endswith(".arrow")]  # stamps unchanged: shards are not read
    _flip(folder / "data-00001.arrow", -1000)
    with pytest.raises(ConfigError, match="data-00001.arrow: content does not match"):
        ActivationStore(folder).layer(1)
    assert not (folder / ".chunks").exists()


@pytest.mark.parametrize("where", ["files and chunks", "chunks only", "absolute"])
def test_a_resealed_manifest_naming_a_file_outside_the_store_is_refused(llama, tmp_path, monkeypatch, where):
    import pyarrow as pa

    import hf_cachehooks._core.entry as entry
    from hf_cachehooks._core.store import seal, unseal

    model, tok = llama
    folder = tmp_path / "c"
    clean = cache_activations(model, tok, records(), folder, [2], shard_size=8, progress=False).layer(2)
    outside = tmp_path / "x.arrow"  # a valid shard, so serving it would "work"
    outside.write_bytes((folder / "data-00001.arrow").read_bytes())
    name = str(outside) if where == "absolute" else "../x.arrow"
    doc = unseal((folder / "manifest.json").read_bytes())
    doc["chunks"][1]["file"] = name
    if where != "chunks only":
        doc["files"][name] = doc["files"].pop("data-00001.arrow")
    (folder / "manifest.json").write_bytes(seal(doc))
    touched = []
    real_map, real_hash = pa.memory_map, entry.hash_file
    monkeypatch.setattr(pa, "memory_map", lambda p, *a: touched.append(str(p)) or real_map(p, *a))
    monkeypatch.setattr(entry, "hash_file", lambda p: touched.append(str(p)) or real_hash(p))
    with pytest.raises(ConfigError, match="corrupt activation cache"):
        ActivationStore(folder)
    store = cache_activations(model, tok, records(), folder, [2], shard_size=8, progress=False)
    assert torch.equal(store.layer(2), clean)
    assert outside.read_bytes() == (folder / "data-00001.arrow").read_bytes()  # still there, untouched
    assert not [p for p in touched if os.path.basename(p) == "x.arrow"]  # never opened


def test_a_resealed_store_gets_one_verdict_from_every_command(llama, tmp_path, capsys):
    """The store's own check is the contract's: verify (root or store), ls, prune and open_entry all refuse it."""
    from hf_cachehooks import management
    from hf_cachehooks._core import entry
    from hf_cachehooks._core.store import seal, unseal
    from hf_cachehooks.cli import main

    model, tok = llama
    folder = tmp_path / "c"
    cache_activations(model, tok, records(), folder, [2], shard_size=8, progress=False)
    assert [e.kind for e in management.list_entries(folder)] == ["activations"]
    doc = unseal((folder / "manifest.json").read_bytes())
    doc["chunks"][0]["file"] = "../elsewhere.arrow"  # `files` still lists data-00000.arrow: the seal is valid
    (folder / "manifest.json").write_bytes(seal(doc))
    problem = "chunk file '../elsewhere.arrow' is not a file the manifest lists"
    capsys.readouterr()
    for argv in (["--cache-dir", str(folder), "verify"], ["verify", str(folder)]):
        assert main(argv) == 1, argv
        out = capsys.readouterr().out
        assert "CORRUPT" in out and problem in out, (argv, out)
    assert main(["--cache-dir", str(folder), "ls"]) == 0
    assert "0 entries" in capsys.readouterr().out
    assert management.list_entries(folder) == [] and management.disk_usage(folder) == {}
    assert management.plan_prune(folder, older_than=-1.0).entries == ()
    assert entry.inspect(folder / "manifest.json", check="manifest") == (None, problem)
    assert entry.open_entry(folder / "manifest.json", kind="activations", remove_corrupt=False) is None
    assert verify_store(folder) == [f"{folder}: {problem}"]


def test_force_removes_only_what_the_store_lists(llama, tmp_path, monkeypatch):
    model, tok = llama
    folder = tmp_path / "c"
    cache_activations(model, tok, records(), folder, [1], shard_size=8, progress=False)
    assert (folder / "CACHEDIR.TAG").exists() and (folder / "data-00002.arrow").exists()
    (folder / "notes.txt").write_text("mine")  # the user's files, added to the store's folder later
    (folder / "data-00009.arrow").write_text("a user's file that happens to look like a shard")
    store = cache_activations(
        model, tok, records(), folder, [1], positions="mean", shard_size=21, force=True, progress=False
    )
    assert store.positions == "mean" and len(store.manifest["chunks"]) == 1
    assert not (folder / "data-00002.arrow").exists()  # the old store's shards went with it
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "data-00009.arrow").exists()


@pytest.mark.parametrize("lost_chunk_0", [False, True])
def test_force_clears_a_killed_run_with_other_inputs(llama, tmp_path, monkeypatch, lost_chunk_0):
    """Told apart by any chunk it finished, not only chunk 0 (rank 0 may have died before finishing its first)."""
    model, tok = llama
    folder = tmp_path / "c"
    real = writer.capture
    calls = []

    def dying(*args, **kwargs):
        if len(calls) == 4:  # chunks 0 and 1 done (batches of 4), killed in chunk 2
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "capture", dying)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(model, tok, records(), folder, [1], shard_size=8, batch_size=4, progress=False)
    assert (folder / ".chunks" / "data-00001.json").exists() and (folder / "data-00001.arrow").exists()
    if lost_chunk_0:
        (folder / ".chunks" / "data-00000.json").unlink()
    monkeypatch.setattr(writer, "capture", real)
    with pytest.raises(ConfigError, match="positions"):
        cache_activations(model, tok, records(), folder, [1], positions="mean", progress=False)
    store = cache_activations(
        model, tok, records(), folder, [1], positions="mean", shard_size=21, force=True, progress=False
    )
    assert store.positions == "mean" and len(store) == 21
    assert not (folder / "data-00001.arrow").exists() and not (folder / ".chunks").exists()


def test_an_expired_store_is_re_extracted(llama, tmp_path, monkeypatch, caplog):
    import time

    model, tok = llama
    folder = tmp_path / "c"
    first = cache_activations(model, tok, records(), folder, [1], progress=False)
    later = lambda: time.time() + 3 * 86400  # noqa: E731
    calls = _extractions(monkeypatch)
    week, day = CacheConfig(max_age=timedelta(days=7), clock=later), CacheConfig(max_age=timedelta(days=1), clock=later)
    cache_activations(model, tok, records(), folder, [1], cache=week, progress=False)
    cache_activations(model, tok, records(), folder, [1], cache=CacheConfig(clock=later), progress=False)  # never
    assert calls == []
    with caplog.at_level("INFO"):
        again = cache_activations(model, tok, records(), folder, [1], cache=day, progress=False)
    assert calls and "expired" in caplog.text
    assert torch.equal(again.layer(1), first.layer(1))
    assert again.manifest["created_at"] > first.manifest["created_at"]


def test_a_chunk_is_hashed_while_written_with_one_fsync_and_its_record_matches_the_bytes(tmp_path, monkeypatch):
    import hf_cachehooks._core.entry as entry
    from hf_cachehooks._core.store import unseal

    synced, reread = [], []
    real_fsync, real_hash = os.fsync, entry.hash_file
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    monkeypatch.setattr(entry, "hash_file", lambda path: reread.append(path) or real_hash(path))
    folder = tmp_path / "store"
    folder.mkdir()
    from hf_cachehooks._core.keys import make_key
    from hf_cachehooks._models.extraction import Pooled

    key = make_key("activations", {"model": {"name": "synthetic"}, "n": 8})
    pooled = [(Pooled({1: torch.randn(8, 16)}, torch.arange(8)), 0)]
    table = writer.arrow_table(pooled, 0, [{"label": i % 2} for i in range(8)], ["label"], [1], "float32", 16)
    writer.write_chunk(folder, 0, 0, 8, table, key, 8)
    assert synced == [] and reread == []  # fsynced when the store is finished; never read back to be hashed
    side = unseal((folder / ".chunks" / "data-00000.json").read_bytes())
    shard = folder / "data-00000.arrow"
    assert side["content_hash"] == real_hash(shard) and side["bytes"] == shard.stat().st_size


def test_layer_values_are_read_at_the_recorded_offsets_without_an_arrow_parse(llama, tmp_path, monkeypatch):
    import pyarrow as pa

    model, tok = llama
    store = cache_activations(
        model, tok, records(), tmp_path / "c", [1, 3], dtype="bfloat16", shard_size=8, progress=False
    )
    expected = {layer: store.layer(layer) for layer in (1, 3)}
    assert all(set(c["offsets"]) == {"layer_1", "layer_3"} for c in store.manifest["chunks"])
    monkeypatch.setattr(pa.ipc, "open_stream", lambda *a, **k: pytest.fail("parsed a shard to read a layer"))
    fresh = ActivationStore(tmp_path / "c")
    for layer in (1, 3):
        assert torch.equal(fresh.layer(layer), expected[layer])
    assert len(fresh._maps) == 3  # each shard mapped once for both layers
    view = fresh.select([20, 0, 9])
    assert torch.equal(view.layer(3), expected[3][[20, 0, 9]]) and view._maps is fresh._maps  # views share maps


def test_a_store_written_before_offsets_and_compact_metadata_still_reads(llama, tmp_path):
    """Layout 1 (int64 example_index, per-example JSON, no offsets): read through Arrow, same values."""
    import pyarrow as pa

    from hf_cachehooks._core import entry
    from hf_cachehooks._core.store import seal, unseal

    model, tok = llama
    folder = tmp_path / "c"
    store = cache_activations(model, tok, records(), folder, [2], shard_size=8, progress=False)
    want, labels = store.layer(2), store.column("type")
    doc = unseal((folder / "manifest.json").read_bytes())
    for chunk in doc["chunks"]:  # rewrite each shard as the old writer did: example_index first, int64
        path = folder / chunk["file"]
        table = pa.ipc.open_stream(pa.py_buffer(path.read_bytes())).read_all()
        old = table.add_column(0, "example_index", pa.array(range(chunk["start"], chunk["end"]), pa.int64()))
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, old.schema) as writer:
            writer.write_table(old)
        doc["files"][chunk["file"]] = entry.file_record(path)
        del chunk["offsets"]
    doc.pop("layout")
    (folder / "manifest.json").write_bytes(seal(doc))
    old_store = ActivationStore(folder)
    assert torch.equal(old_store.layer(2), want) and old_store.column("type") == labels
    assert old_store.column("example_index") == list(range(21))


def test_offsets_past_the_end_of_a_shard_are_refused(llama, tmp_path):
    from hf_cachehooks._core.store import seal, unseal

    model, tok = llama
    folder = tmp_path / "c"
    cache_activations(model, tok, records(), folder, [2], shard_size=8, progress=False)
    doc = unseal((folder / "manifest.json").read_bytes())
    doc["chunks"][1]["offsets"]["layer_2"] = doc["chunks"][1]["bytes"] - 8  # a resealed manifest, wrong offset
    (folder / "manifest.json").write_bytes(seal(doc))
    with pytest.raises(ConfigError, match="data-00001.arrow: layer 2 lies past its end"):
        ActivationStore(folder).layer(2)


def test_integer_fields_take_the_narrowest_type_for_every_chunk():
    import pyarrow as pa

    rows = [{"label": i % 2, "id": i * 1000, "big": -(1 << 40) + i, "name": "x", "flag": True} for i in range(40)]
    types = shards.field_types(rows, ["label", "id", "big", "name", "flag"])
    assert types == {"label": pa.int8(), "id": pa.int32(), "big": pa.int64(), "name": None, "flag": None}


def test_a_token_store_carries_int32_example_index_position_and_token_id(llama, tmp_path):
    model, tok = llama
    texts = records(5)
    store = cache_activations(model, tok, texts, tmp_path / "c", [2], positions="all", shard_size=2, progress=False)
    _, batch = next(batches([r["text"] for r in texts], tok, 5))
    mask = batch["attention_mask"].bool()
    counts = mask.sum(1).tolist()
    assert store.column("example_index") == [i for i, n in enumerate(counts) for _ in range(n)]
    assert store.column("position") == [p for n in counts for p in range(n)]
    assert store.column("token_id") == batch["input_ids"][mask].tolist()
    assert store.column("id") == [i for i, n in enumerate(counts) for _ in range(n)]
    assert len(store) == sum(counts) == store.layer(2).shape[0]
    schema = store.tables()[0].schema
    assert {schema.field(n).type for n in ("example_index", "position", "token_id")} == {__import__("pyarrow").int32()}


def test_a_resumed_run_hashes_the_shards_an_earlier_run_left(llama, tmp_path, monkeypatch):
    """Shards are fsynced only when the store is finished: after a crash a sidecar may outlive its shard's bytes."""
    from hf_cachehooks._core import entry
    from hf_cachehooks._core.store import seal, unseal

    monkeypatch.setattr(entry, "HASH_ALWAYS_BELOW", 0)  # these tiny shards would be hashed anyway: trust stamps
    model, tok = llama
    clean = cache_activations(
        model, tok, records(), tmp_path / "clean", [2], shard_size=8, batch_size=4, progress=False
    )
    real = _killed_after_three_batches(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(model, tok, records(), tmp_path / "c", [2], shard_size=8, batch_size=4, progress=False)
    shard, side_path = tmp_path / "c" / "data-00000.arrow", tmp_path / "c" / ".chunks" / "data-00000.json"
    _flip(shard, -100)  # the bytes did not all reach the disk, though the file's metadata did
    side = unseal(side_path.read_bytes())
    st = os.stat(shard)
    side["stamp"] = [st.st_ino, st.st_mtime_ns, st.st_ctime_ns]  # a stamp that matches: only a hash can tell
    side_path.write_bytes(seal(side))
    monkeypatch.setattr(writer, "capture", real)
    resumed = _extractions(monkeypatch)
    store = cache_activations(model, tok, records(), tmp_path / "c", [2], shard_size=8, batch_size=4, progress=False)
    assert len(resumed) == 6  # chunk 0 redone too (21 examples, batches of 4 within chunks of 8)
    assert torch.equal(store.layer(2), clean.layer(2))


def test_every_shard_is_fsynced_before_the_manifest_is_committed(tmp_path, monkeypatch):
    from hf_cachehooks._core import entry

    events = []
    real_fsync, real_commit = os.fsync, entry.commit
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(entry, "commit", lambda *a, **k: events.append("commit") or real_commit(*a, **k))
    _synthetic_store(tmp_path / "s", rows=64, hidden=8, chunks=3)
    shards = [i for i, e in enumerate(events) if e.endswith(".arrow")]
    assert len(shards) == 3 and max(shards) < events.index("commit")


def test_the_default_shard_holds_about_32_mib_and_never_fewer_than_1024_examples():
    from hf_cachehooks.activations.shards import default_shard_size

    assert default_shard_size(1_000_000, 1, 576, "float16", "last", 1) == (32 << 20) // 1152 == 29_127
    assert default_shard_size(1_000_000, 1, 576, "float32", "mean", 1) == (32 << 20) // 2304
    assert default_shard_size(1_000_000, 4, 4096, "bfloat16", "last", 1) == 1024  # 32 KiB a row: the floor
    assert default_shard_size(1_000_000, 1, 576, "float16", "all", 1) == 1024  # tokens per example not known yet
    # several processes: about four chunks for each rank, still never below 1,024 examples
    assert default_shard_size(200_000, 1, 576, "float16", "last", 4) == 12_500
    assert default_shard_size(5_000, 1, 576, "float16", "last", 4) == 1024


def test_shard_size_unset_takes_the_default_and_a_given_one_is_honoured(llama, tmp_path):
    model, tok = llama
    default = cache_activations(model, tok, records(), tmp_path / "default", [1, 2], progress=False)
    assert default.manifest["shard_size"] == (32 << 20) // (2 * 16 * 2) and len(default.manifest["chunks"]) == 1
    given = cache_activations(model, tok, records(), tmp_path / "given", [1, 2], shard_size=8, progress=False)
    assert given.manifest["shard_size"] == 8 and [c["rows"] for c in given.manifest["chunks"]] == [8, 8, 5]
    assert torch.equal(default.layer(2), given.layer(2))


def test_a_run_resumed_without_a_shard_size_keeps_the_chunks_of_the_run_it_resumes(llama, tmp_path, monkeypatch):
    model, tok = llama
    real = _killed_after_three_batches(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(model, tok, records(), tmp_path / "c", [2], shard_size=8, batch_size=4, progress=False)
    monkeypatch.setattr(writer, "capture", real)
    resumed = _extractions(monkeypatch)
    store = cache_activations(model, tok, records(), tmp_path / "c", [2], batch_size=4, progress=False)
    assert len(resumed) == 4  # chunks 1 and 2 of 8 examples only, not one default-sized chunk from scratch
    assert store.manifest["shard_size"] == 8 and len(store.manifest["chunks"]) == 3
    clean = cache_activations(model, tok, records(), tmp_path / "clean", [2], progress=False)
    assert torch.equal(store.layer(2), clean.layer(2))


@pytest.mark.parametrize(
    "labels",
    [[0, 1, 1, 0], ["b", "a", "b"], [True, False, True], [1, True, 1.0], [0.0, -0.0, 1.5], [1, None, 2], [[1], [1]]],
)
def test_label_counts_name_each_label_by_its_text(labels):
    from collections import Counter

    from hf_cachehooks.activations.shards import label_counts

    rows = [{"label": y} for y in labels]
    want = dict(Counter(str(y) for y in labels))
    assert label_counts(rows, "label") == want
    assert label_counts([*rows, {"text": "unlabelled"}], "label") == want  # rows without the field are skipped


def test_a_chunk_table_takes_each_rows_fields_in_the_order_of_its_examples():
    from hf_cachehooks._models.extraction import Pooled

    rows = [{"label": i % 3, "name": f"r{i}"} for i in range(10)]
    fields = shards.field_types(rows, ["label", "name"])
    values = torch.arange(8.0).reshape(4, 2)
    in_order = writer.arrow_table([(Pooled({1: values}, torch.arange(4)), 0)], 4, rows, fields, [1], "float32", 2)
    assert in_order.column("name").to_pylist() == ["r4", "r5", "r6", "r7"]
    shuffled = [(Pooled({1: values[:2]}, torch.tensor([1, 0])), 2), (Pooled({1: values[2:]}, torch.tensor([0, 0])), 0)]
    table = writer.arrow_table(shuffled, 4, rows, fields, [1], "float32", 2)
    assert table.column("name").to_pylist() == ["r7", "r6", "r4", "r4"]
    assert table.column("label").to_pylist() == [1, 0, 1, 1] and table.schema.field("label").type == fields["label"]


def test_integer_fields_are_kept_once_over_all_rows_and_sliced_by_each_chunk():
    from hf_cachehooks._models.extraction import Pooled

    rows = [{"label": i % 2, "id": 1000 + i, "name": f"r{i}"} for i in range(10)]
    types, columns = shards.field_columns(rows, ["label", "id", "name"])
    assert set(columns) == {"label", "id"} and columns["label"].dtype == np.int8 and columns["id"].dtype == np.int16
    assert columns["id"].tolist() == [1000 + i for i in range(10)]
    pooled = [(Pooled({1: torch.zeros(3, 2)}, torch.tensor([2, 0, 1])), 0)]
    table = writer.arrow_table(pooled, 5, rows, types, [1], "float32", 2, columns)
    assert table.column("id").to_pylist() == [1007, 1005, 1006]
    assert table.column("name").to_pylist() == ["r7", "r5", "r6"]
    counted = shards.label_counts(rows, "label", columns["label"])
    assert counted == shards.label_counts(rows, "label") == {"0": 5, "1": 5}


def test_a_resumed_run_takes_its_shard_size_from_any_chunk_left(llama, tmp_path, monkeypatch):
    """With several processes rank 0 may die before its first chunk: the shard size comes from any chunk left."""
    model, tok = llama
    clean = cache_activations(model, tok, records(), tmp_path / "clean", [2], shard_size=5, progress=False)
    real = _killed_after_three_batches(monkeypatch, batches=4)  # chunks 0 and 1 done, killed inside chunk 2
    with pytest.raises(KeyboardInterrupt):
        cache_activations(model, tok, records(), tmp_path / "c", [2], shard_size=8, batch_size=4, progress=False)
    (tmp_path / "c" / ".chunks" / "data-00000.json").unlink()  # as if chunk 0's process had died first
    monkeypatch.setattr(writer, "capture", real)
    resumed = _extractions(monkeypatch)
    store = cache_activations(model, tok, records(), tmp_path / "c", [2], shard_size=5, batch_size=4, progress=False)
    assert len(resumed) == 4  # chunks 0 and 2 of 8 examples (2 batches each); chunk 1 kept
    assert store.manifest["shard_size"] == 8 and [c["rows"] for c in store.manifest["chunks"]] == [8, 8, 5]
    assert torch.equal(store.layer(2), clean.layer(2))


def test_a_finished_chunk_cut_from_another_shard_size_is_not_taken_for_this_one(llama, tmp_path, monkeypatch):
    from hf_cachehooks._core.store import unseal
    from hf_cachehooks.activations.shards import chunk_done

    model, tok = llama
    _killed_after_three_batches(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(model, tok, records(), tmp_path / "c", [2], shard_size=8, batch_size=4, progress=False)
    digest = unseal((tmp_path / "c" / ".chunks" / "data-00000.json").read_bytes())["key"]["digest"]
    assert chunk_done(tmp_path / "c", 0, digest, "hash", (0, 8)) and chunk_done(tmp_path / "c", 0, digest, "hash")
    assert not chunk_done(tmp_path / "c", 0, digest, "hash", (0, 5))  # chunk 0 of shard_size=5 holds fewer rows
