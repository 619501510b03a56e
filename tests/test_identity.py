import copy
import os
import time

import pytest
import torch

from hf_cachehooks._models.identity import (
    effective_generation,
    files_state,
    model_identity,
    params_fingerprint,
    split_hub_path,
    tokenizer_identity,
)
from tests.conftest import make_llama, make_tokenizer, rewrite_in_place


def test_params_fingerprint_sees_any_weight_change():
    model = make_llama()
    before = params_fingerprint(model)
    assert params_fingerprint(copy.deepcopy(model)) == before
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 4] += 1e-6
    assert params_fingerprint(model) != before


def test_model_identity_fields():
    ident = model_identity(make_llama())
    assert ident["dtype"] == "float32" and ident["adapter"] is None and ident["class"] == "LlamaForCausalLM"
    assert model_identity(make_llama(layers=3))["config"] != ident["config"]
    # the mode the answers are made in: always eval (runners.eval_mode), so a train-mode object has the same one
    assert ident["mode"] == "eval" and model_identity(make_llama().train()) == ident


def test_tokenizer_identity_holds_the_settings_that_decide_a_batch():
    """Finding 8: classification truncates at model_max_length on truncation_side and pads on padding_side."""
    tok = make_tokenizer()
    before = tokenizer_identity(tok)
    assert before["model_max_length"] == str(int(1e30))  # transformers' "no limit", beyond what JSON ints hold
    assert (before["truncation_side"], before["padding_side"]) == ("right", "right")
    for name, value in (("model_max_length", 128), ("truncation_side", "left"), ("padding_side", "left")):
        changed = copy.deepcopy(tok)
        setattr(changed, name, value)
        after = tokenizer_identity(changed)
        assert after[name] == value and {k for k in after if after[k] != before[k]} == {name}


def test_tokenizer_identity_ignores_runtime_padding_state():
    tok = make_tokenizer()
    before = tokenizer_identity(tok)
    tok(["a b", "a"], padding=True, truncation=True, max_length=4)
    assert tokenizer_identity(tok) == before
    assert tokenizer_identity(make_tokenizer(extra_words=["x"]))["vocab"] != before["vocab"]
    assert tokenizer_identity(make_tokenizer(chat_template="{{ 1 }}"))["chat_template"] != before["chat_template"]


def test_tokenizer_identity_is_the_same_for_the_same_state_and_sees_vocab_changes_in_place():
    from tokenizers import models, normalizers

    tok = make_tokenizer()
    before = tokenizer_identity(tok)
    assert all(tokenizer_identity(make_tokenizer()) == before for _ in range(5))  # hash-map order never leaks
    # the same vocabulary size, two ids swapped, the backend's model replaced in place: a new tokenizer
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    vocab["paris"], vocab["blue"] = vocab["blue"], vocab["paris"]
    tok.backend_tokenizer.model = models.WordLevel(vocab=vocab, unk_token="<unk>")
    swapped = tokenizer_identity(tok)
    assert swapped["vocab"] != before["vocab"] and swapped["backend"] == before["backend"]
    tok.add_tokens(["zebra"])  # an added token, through the tokenizer itself
    assert tokenizer_identity(tok)["vocab"] not in (before["vocab"], swapped["vocab"])
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()  # not the vocabulary: the rest of the state
    assert tokenizer_identity(tok)["backend"] != before["backend"]
    padded = make_tokenizer()
    padded.backend_tokenizer.enable_padding(pad_id=0, pad_token="<pad>")  # set and left on: still no new token
    padded.backend_tokenizer.enable_truncation(max_length=7)
    assert tokenizer_identity(padded) == before


def test_tokenizer_identity_of_other_layouts_and_slow_tokenizers():
    import orjson

    from hf_cachehooks._core.keys import dumps, hash_bytes

    class Backend:
        def __init__(self, state):
            self.state = state

        def to_str(self):  # a layout the exact skip does not know: parsed in full, padding still left out
            return orjson.dumps(self.state).decode()

    class Fast:
        special_tokens_map = {"eos_token": "</s>"}
        chat_template = None

        def __init__(self, state):
            self.backend_tokenizer = Backend(state)

    state = {"model": {"vocab": {"a": 0, "b": 1}}, "padding": None, "version": "1.0"}
    base = tokenizer_identity(Fast(state))
    assert tokenizer_identity(Fast({**state, "padding": {"pad_id": 3}, "truncation": {"max_length": 2}})) == base
    assert tokenizer_identity(Fast({**state, "model": {"vocab": {"a": 1, "b": 0}}}))["vocab"] != base["vocab"]
    assert tokenizer_identity(Fast({**state, "decoder": {"type": "BPE"}}))["backend"] != base["backend"]

    class Slow:
        special_tokens_map: dict = {}
        chat_template = None

        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return dict(self.vocab)

    slow = tokenizer_identity(Slow({"b": 1, "a": 0}))
    assert slow["backend"] is None and slow["vocab"] == hash_bytes(dumps(sorted({"a": 0, "b": 1}.items())))
    assert tokenizer_identity(Slow({"b": 0, "a": 1}))["vocab"] != slow["vocab"]


def test_effective_generation_merges_and_normalises():
    defaults = {
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "eos_token_id": 2,
        "use_cache": True,
        "max_length": None,
    }
    greedy = effective_generation(defaults, {"do_sample": False, "max_new_tokens": 32})
    assert greedy == {
        "do_sample": False,
        "eos_token_id": 2,
        "max_new_tokens": 32,
        "num_beams": 1,
        "repetition_penalty": 1,
        "length_penalty": 1,
        "num_return_sequences": 1,
        "no_repeat_ngram_size": 0,
        "num_beam_groups": 1,
        "diversity_penalty": 0,
        "early_stopping": False,
        "use_cache": True,  # in the key: a full recompute differs from the KV-cache path in the last bits
    }
    # the model's sampling defaults count when the user does not override them
    sampled = effective_generation(defaults, {"max_new_tokens": 32})
    assert sampled["temperature"] == 0.6 and sampled["top_p"] == 0.9
    assert effective_generation({}, {"temperature": 1.0, "do_sample": True}) == effective_generation(
        {}, {"do_sample": True}
    )


# The settings left out of the key, each with the value that proves it changes no text (`_NOT_OUTPUT`); a name
# added there without a proof here fails the first assertion.
_PROVEN = {
    "output_attentions": True,
    "output_hidden_states": True,
    "output_scores": True,
    "output_logits": True,
    "return_dict_in_generate": True,
    "pad_token_id": 7,
}
_BOOKKEEPING = {"transformers_version", "_from_model_config"}


def test_settings_left_out_of_the_key_never_change_the_text():
    from hf_cachehooks._models import identity
    from hf_cachehooks._models.runners import generate_texts

    assert identity._NOT_OUTPUT == set(_PROVEN) | _BOOKKEEPING
    model, tok = make_llama(), make_tokenizer()
    texts = ["what is the capital of france ?", "is the sky blue ?", "two"]
    greedy = {"max_new_tokens": 6, "do_sample": False}
    expected = generate_texts(model, tok, texts, greedy)
    for name, value in _PROVEN.items():
        assert generate_texts(model, tok, texts, {**greedy, name: value}) == expected, name
    assert generate_texts(model, tok, texts, {**greedy, "cache_implementation": "static"}) == expected
    # everything else is in the key, the clock-bound max_time refused (tests/test_wrong_hits.py)
    for name, value in (
        ("use_cache", False),
        ("low_memory", True),
        ("prefill_chunk_size", 4),
        ("cache_implementation", "quantized"),
        ("max_cache_len", 64),
    ):
        assert effective_generation({}, {name: value})[name] == value, name
    assert "cache_implementation" not in effective_generation({}, {"cache_implementation": "static"})
    with pytest.raises(Exception, match="max_time=1 .*cannot be cached"):
        effective_generation({}, {"max_time": 1})


def test_split_hub_path(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--org--name" / "snapshots" / ("c" * 40)
    assert split_hub_path(str(snap)) == ("org/name", "c" * 40)
    ref = tmp_path / "hub" / "models--org--other" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("d" * 40)
    assert split_hub_path("org/other") == ("org/other", "d" * 40)
    assert split_hub_path("org/absent") == ("org/absent", None)


def test_files_state_follows_file_content(tmp_path):
    model = make_llama()
    model.save_pretrained(tmp_path / "m")
    opts = {"dtype": "float32"}
    first = files_state(str(tmp_path / "m"), opts, tmp_path / "root")
    assert files_state(str(tmp_path / "m"), opts, tmp_path / "root") == first
    assert files_state(str(tmp_path / "m"), {"dtype": "bfloat16"}, tmp_path / "root") != first
    make_llama(seed=1).save_pretrained(tmp_path / "m")
    assert files_state(str(tmp_path / "m"), opts, tmp_path / "root") != first
    assert files_state("org/not-downloaded", opts, tmp_path / "root") is None


@pytest.mark.gpu
def test_params_fingerprint_is_device_independent():
    model = make_llama()
    assert params_fingerprint(model) == params_fingerprint(copy.deepcopy(model).cuda())


def test_files_state_hashes_the_subfolder_the_weights_load_from(tmp_path):
    for folder, seed in (("a", 0), ("b", 1)):
        make_tokenizer().save_pretrained(tmp_path / folder)
        make_llama(seed=seed).save_pretrained(tmp_path / folder / "final")
    opts = {"dtype": "float32", "load_kwargs": {"subfolder": "final"}}
    first = files_state(str(tmp_path / "a"), opts, tmp_path / "root")
    assert files_state(str(tmp_path / "b"), opts, tmp_path / "root") != first  # same top level, other final/
    make_llama(seed=2).save_pretrained(tmp_path / "a" / "final")  # retrained
    assert files_state(str(tmp_path / "a"), opts, tmp_path / "root") != first


def test_files_state_sees_a_chat_template_rewritten_with_its_mtime_restored(tmp_path):
    make_tokenizer(chat_template="{{ 'x' }}").save_pretrained(tmp_path / "m")
    opts = {"dtype": "float32"}
    first = files_state(str(tmp_path / "m"), opts, tmp_path / "root")
    time.sleep(0.05)  # past the file-time tick: the memo now remembers it
    assert files_state(str(tmp_path / "m"), opts, tmp_path / "root") == first
    assert "chat_template.jinja" in (tmp_path / "root" / "identity" / "file_hashes.json").read_text()
    rewrite_in_place(tmp_path / "m" / "chat_template.jinja", b"{{ 'y' }}")
    assert files_state(str(tmp_path / "m"), opts, tmp_path / "root") != first


def test_file_hash_memo_is_a_sealed_entry_and_a_bad_one_is_rebuilt(tmp_path, caplog):
    from hf_cachehooks._core.entry import open_entry

    make_tokenizer().save_pretrained(tmp_path / "m")
    memo = tmp_path / "root" / "identity" / "file_hashes.json"
    files_state(str(tmp_path / "m"), {}, tmp_path / "root")
    time.sleep(0.05)
    first = files_state(str(tmp_path / "m"), {}, tmp_path / "root")
    found = open_entry(memo, kind="file-hashes")
    assert found is not None and len(found.doc["hashes"]) == 3
    for bad in (b"[]", memo.read_bytes().replace(b'"hashes"', b'"hashez"'), b"garbage"):
        memo.write_bytes(bad)
        assert files_state(str(tmp_path / "m"), {}, tmp_path / "root") == first
        assert open_entry(memo, kind="file-hashes") is not None  # rebuilt


def test_identity_memo_is_checked_against_its_state(tmp_path, caplog):
    from hf_cachehooks._core.entry import open_entry
    from hf_cachehooks._models.identity import remember_identity, remembered_identity

    root = tmp_path / "root"
    ident = {"model": {"name": "m"}, "tokenizer": None, "generation_defaults": {}}
    remember_identity("aaa", ident, root)
    remember_identity("bbb", {**ident, "model": {"name": "other"}}, root)
    assert remembered_identity("aaa", root) == ident
    assert (root / "identity" / "CACHEDIR.TAG").exists()
    assert open_entry(root / "identity" / "aaa.json", kind="identity", digest="aaa").key["digest"] == "aaa"
    os.replace(root / "identity" / "bbb.json", root / "identity" / "aaa.json")  # another state's memo
    assert remembered_identity("aaa", root) is None
    remember_identity("aaa", {"model": "x", "tokenizer": None, "generation_defaults": {}}, root)
    assert remembered_identity("aaa", root) is None  # wrong shape: never served
    assert not (root / "identity" / "aaa.json").exists()


def test_files_state_is_remembered_in_process_and_forgotten_by_exactly_what_changes_a_file(tmp_path, monkeypatch):
    """A repeated files_state reads no file (one lstat each); a file rewritten in place, a file added, a link
    retargeted or the on-disk memo rewritten all take the full path, and the state follows the content."""
    from hf_cachehooks._core import fingerprint

    make_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "w1.safetensors").write_bytes(b"1" * 64)
    (tmp_path / "w2.safetensors").write_bytes(b"2" * 64)
    os.symlink(tmp_path / "w1.safetensors", tmp_path / "m" / "model.safetensors")
    root, opts = tmp_path / "root", {"dtype": "float32"}
    first = files_state(str(tmp_path / "m"), opts, root)
    time.sleep(0.05)  # past the file-time tick: stamps are trusted from here on
    assert files_state(str(tmp_path / "m"), opts, root) == first
    hashed: list = []
    read = fingerprint._read_memo
    real_hash = fingerprint.hash_file
    monkeypatch.setattr(fingerprint, "hash_file", lambda p: hashed.append(p) or real_hash(p))
    monkeypatch.setattr(fingerprint, "_read_memo", lambda p: hashed.append("memo") or read(p))
    assert files_state(str(tmp_path / "m"), opts, root) == first
    assert hashed == []  # served from this process's memo: no file read, not even the on-disk memo

    rewrite_in_place(
        tmp_path / "m" / "tokenizer.json",
        (tmp_path / "m" / "tokenizer.json").read_bytes().replace(b'"unk_token"', b'"unk_tokem"'),
    )
    changed = files_state(str(tmp_path / "m"), opts, root)
    assert changed != first and any(str(p).endswith("tokenizer.json") for p in hashed)

    time.sleep(0.05)
    os.remove(tmp_path / "m" / "model.safetensors")  # the link retargeted: other weights, same name
    os.symlink(tmp_path / "w2.safetensors", tmp_path / "m" / "model.safetensors")
    retargeted = files_state(str(tmp_path / "m"), opts, root)
    assert retargeted not in (first, changed)

    time.sleep(0.05)
    (tmp_path / "m" / "generation_config.json").write_text("{}")  # a new file in the folder
    added = files_state(str(tmp_path / "m"), opts, root)
    assert added not in (first, changed, retargeted)

    time.sleep(0.05)
    files_state(str(tmp_path / "m"), opts, root)
    hashed.clear()
    memo = root / "identity" / "file_hashes.json"
    memo.write_bytes(b"garbage")  # the on-disk memo damaged: read again (and rebuilt), the state unchanged
    assert files_state(str(tmp_path / "m"), opts, root) == added
    assert "memo" in hashed


def test_metric_versions_follow_the_script_content(tmp_path, monkeypatch):
    from hf_cachehooks.evaluation import metrics

    (tmp_path / "mine.py").write_bytes(b"# version a\n")
    monkeypatch.setattr(metrics, "_SCRIPT_DIR", str(tmp_path))
    first = metrics.metric_versions(["mine"])
    time.sleep(0.05)
    assert metrics.metric_versions(["mine"]) == first  # remembered by its stamp now
    rewrite_in_place(tmp_path / "mine.py", b"# version b\n")  # same size and mtime: ctime still moves
    assert metrics.metric_versions(["mine"]) != first
    with pytest.raises(Exception, match="Unknown metric"):
        metrics.metric_versions(["absent"])
