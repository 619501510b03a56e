"""Activation extraction and store: layer semantics, positions, dtypes, views, errors, resume, two processes."""

import json
import os

import numpy as np
import pytest
import torch

import hf_cachehooks.activation_writer as writer
from hf_cachehooks.activation_writer import cache_activations
from hf_cachehooks.activations import ActivationStore
from hf_cachehooks.errors import ConfigError
from hf_cachehooks.extraction import batches, capture, pool
from tests.conftest import make_llama, make_tokenizer

WORDS = "what is the capital of france ? paris two plus four yes no blue red green sky".split()


def records(n=21):
    return [{"text": " ".join(WORDS[(i * 3) % 7 : (i * 3) % 7 + 1 + i % 6]), "type": "testing" if i % 3 else
             "deployment", "id": i} for i in range(n)]


@pytest.fixture(scope="module")
def llama():
    return make_llama(layers=3), make_tokenizer()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, bos_token_id=1,
                                      eos_token_id=2)).eval()


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                vocab_size=64)).eval()


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
    last, first = pool(got, batch["attention_mask"], batch["input_ids"], "last"), \
        pool(got, batch["attention_mask"], batch["input_ids"], "first")
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
    store = cache_activations(model, tok, rows, tmp_path / dtype, [1, 3], dtype=dtype, batch_size=4, shard_size=8,
                              progress=False)
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
    info = json.load(open(tmp_path / "c" / "layer_info.json"))  # the seed's integrity snippet
    assert info["layers"] == [1, 2] and info["num_examples"] == 21
    meta = json.load(open(tmp_path / "c" / "metadata.json"))
    assert meta["examples"][4] == {"index": 4, "text": records()[4]["text"], "type": "testing", "id": 4}
    assert store.column("type") == [r["type"] for r in records()]
    ds = store.to_dataset()
    assert ds.num_rows == 21 and "layer_2" in ds.column_names and ds[3]["id"] == 3
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
    with pytest.raises(ConfigError, match=r"Layer 2 is not in this cache \(cached: 1, 3\).*--layers including 2"):
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
    store = cache_activations(model, tok, records(), tmp_path / "c", [1], positions="mean", force=True,
                              progress=False)
    assert store.positions == "mean"


def test_batch_size_and_shard_size_do_not_change_the_key(llama, tmp_path, monkeypatch):
    model, tok = llama
    first = cache_activations(model, tok, records(), tmp_path / "c", [1], batch_size=2, shard_size=8,
                              progress=False)
    monkeypatch.setattr(writer, "capture", lambda *a, **k: pytest.fail("extracted again"))
    again = cache_activations(model, tok, records(), tmp_path / "c", [1], batch_size=7, shard_size=5,
                              progress=False)
    assert torch.equal(again.layer(1), first.layer(1))


def test_interrupted_run_resumes_from_complete_chunks(llama, tmp_path, monkeypatch):
    model, tok = llama
    clean = cache_activations(model, tok, records(), tmp_path / "clean", [2], shard_size=8, batch_size=4,
                              progress=False)
    calls = []
    real = writer.capture

    def dying(*args, **kwargs):
        if len(calls) == 3:  # chunk 0 (two batches of 4) done, killed inside chunk 1
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "capture", dying)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(model, tok, records(), tmp_path / "c", [2], shard_size=8, batch_size=4, progress=False)
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["data-00000.arrow", "data-00000.json"]  # no partial chunk, no manifest
    with pytest.raises(ConfigError):
        ActivationStore(tmp_path / "c")
    resumed_calls = []
    monkeypatch.setattr(writer, "capture", lambda *a, **k: resumed_calls.append(1) or real(*a, **k))
    store = cache_activations(model, tok, records(), tmp_path / "c", [2], shard_size=8, batch_size=4,
                              progress=False)
    assert len(resumed_calls) == 4  # chunks 1 and 2 only (13 examples, batches of 4)
    assert torch.equal(store.layer(2), clean.layer(2))


def _rank_main(rank, world, init_file, folder):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, tok = make_llama(layers=3), make_tokenizer()
        cache_activations(model, tok, records(37), folder, [1, 3], shard_size=5, batch_size=3, progress=False)
    finally:
        dist.destroy_process_group()


def test_two_processes_write_one_store_equal_to_a_single_process_store(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path / "multi")), nprocs=2, join=True)
    multi = ActivationStore(tmp_path / "multi")
    single = cache_activations(make_llama(layers=3), make_tokenizer(), records(37), tmp_path / "single", [1, 3],
                               shard_size=5, progress=False)
    assert multi.manifest["key"]["digest"] == single.manifest["key"]["digest"]
    for layer in (1, 3):
        assert torch.equal(multi.layer(layer), single.layer(layer))
    assert multi.column("example_index") == list(range(37))
    # a store made by two processes is a hit for one (the key leaves out the process count)
    monkeypatch.setattr(writer, "capture", lambda *a, **k: pytest.fail("extracted again"))
    cache_activations(make_llama(layers=3), make_tokenizer(), records(37), tmp_path / "multi", [1, 3],
                      progress=False)
    assert os.environ.get("WORLD_SIZE") is None


def test_contrastive_pairs_become_labelled_rows(llama, tmp_path):
    model, tok = llama
    pairs = [{"positive": "yes sky blue", "negative": "no sky red"}, {"positive": "paris", "negative": "two"}]
    store = cache_activations(model, tok, pairs, tmp_path / "p", [1], progress=False)
    assert store.column("label") == ["positive", "negative"] * 2 and store.column("pair") == [0, 0, 1, 1]
