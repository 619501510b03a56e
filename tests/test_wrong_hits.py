"""Every wrong hit of issue 11 that lives in identity, fingerprints or batching is a miss, end to end.

Each test builds the situation that used to serve stale or another model's predictions as a hit,
through `evaluate_model` on tiny models saved to disk, and checks the served key and predictions.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import orjson
import pytest
import torch

from hf_cachehooks import EvalConfig, evaluate_model
from tests.conftest import make_llama, make_tokenizer, rewrite_in_place

CFG = EvalConfig(max_new_tokens=4, batch_size=2, metrics=("exact_match",))
SUB = EvalConfig(max_new_tokens=4, batch_size=2, metrics=("exact_match",), load_kwargs={"subfolder": "final"})


def _save(folder: Path, seed: int, subfolder: str = "") -> Path:
    make_tokenizer().save_pretrained(folder)
    make_llama(seed=seed).save_pretrained(folder / subfolder if subfolder else folder)
    return folder


def _truth(seed: int, rows, config=CFG) -> list:
    """Predictions of the model with this seed, never through the cache."""
    from dataclasses import replace

    return evaluate_model(
        make_llama(seed=seed), rows, replace(config, use_prediction_cache=False), tokenizer=make_tokenizer()
    ).predictions


def _seeds_differ(rows) -> None:
    assert _truth(0, rows) != _truth(1, rows), "pick seeds whose tiny models answer differently"


# 1. load_kwargs={"subfolder": ...} ---------------------------------------------------------------


def test_retrained_subfolder_is_a_miss_and_twin_folders_differ(tmp_path, qa_rows):
    _seeds_differ(qa_rows)
    a = _save(tmp_path / "a", 0, "final")
    first = evaluate_model(str(a), qa_rows, SUB)
    assert first.cache_status == "miss" and first.predictions == _truth(0, qa_rows)
    assert evaluate_model(str(a), qa_rows, SUB).cache_status == "hit"

    b = _save(tmp_path / "b", 1, "final")  # identical top-level files, another final/
    other = evaluate_model(str(b), qa_rows, SUB)
    assert other.cache_status == "miss" and other.key != first.key and other.predictions == _truth(1, qa_rows)

    make_llama(seed=1).save_pretrained(a / "final")  # retrain a/final
    again = evaluate_model(str(a), qa_rows, SUB)
    assert again.key == other.key and again.predictions == _truth(1, qa_rows)


# 2. weights rewritten in place with size and mtime restored -----------------------------------------


def test_weights_rewritten_in_place_with_mtime_restored_are_a_miss(tmp_path, qa_rows):
    _seeds_differ(qa_rows)
    folder = _save(tmp_path / "m", 0)
    _save(tmp_path / "other", 1)
    first = evaluate_model(str(folder), qa_rows, CFG)
    time.sleep(0.05)  # past the file-time tick, so the file-hash memo remembers the stamps
    assert evaluate_model(str(folder), qa_rows, CFG).cache_status == "hit"
    rewrite_in_place(folder / "model.safetensors", (tmp_path / "other" / "model.safetensors").read_bytes())
    after = evaluate_model(str(folder), qa_rows, CFG)
    assert after.key != first.key and after.predictions == _truth(1, qa_rows)


# 3. NaN / ±inf in a data field ------------------------------------------------------------------


def test_nan_inf_and_none_in_data_are_different_data(tiny, qa_rows):
    model, tok = tiny
    config = EvalConfig(max_new_tokens=2, batch_size=8, metrics=("exact_match",), prompt_template="{question} {score}")
    results = [
        evaluate_model(model, [{**r, "score": value} for r in qa_rows], config, tokenizer=tok)
        for value in (None, float("nan"), float("inf"), float("-inf"))
    ]
    assert [r.cache_status for r in results] == ["miss"] * 4
    assert len({r.key for r in results}) == 4


# 4. identity memos swapped or edited ----------------------------------------------------------


def test_swapped_or_edited_identity_memos_never_serve_another_model(tmp_path, root, qa_rows):
    _seeds_differ(qa_rows)
    a, b = _save(tmp_path / "a", 0), _save(tmp_path / "b", 1)
    run_a, run_b = evaluate_model(str(a), qa_rows, CFG), evaluate_model(str(b), qa_rows, CFG)
    memos = sorted(p for p in (root / "identity").glob("*.json") if p.name != "file_hashes.json")
    assert len(memos) == 2
    first, second = memos
    tmp = first.with_name("swap")
    os.replace(first, tmp)
    os.replace(second, first)
    os.replace(tmp, second)
    for folder, run in ((a, run_a), (b, run_b)):
        again = evaluate_model(str(folder), qa_rows, CFG)
        assert again.key == run.key and again.predictions == run.predictions

    # the file-hash memo edited so that a's weights carry b's digest: its state would be b's
    time.sleep(0.05)
    evaluate_model(str(a), qa_rows, CFG)
    evaluate_model(str(b), qa_rows, CFG)
    memo_path = root / "identity" / "file_hashes.json"
    doc = orjson.loads(memo_path.read_bytes())
    hashes = doc.get("hashes", doc)
    mine, theirs = str((a / "model.safetensors").resolve()), str((b / "model.safetensors").resolve())
    hashes[mine][1] = hashes[theirs][1]
    memo_path.write_bytes(orjson.dumps(doc))
    again = evaluate_model(str(a), qa_rows, CFG)
    assert again.key == run_a.key and again.predictions == run_a.predictions


# 7. a tokenizer without a pad token is never changed -------------------------------------------------


def _no_pad_tokenizer():
    tok = make_tokenizer()
    tok.pad_token = None  # GPT-2 / Llama style: only eos
    return tok


def test_tokenizer_without_pad_token_is_not_mutated_so_the_second_run_hits(qa_rows):
    model, tok = make_llama(), _no_pad_tokenizer()
    side = tok.padding_side
    first = evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    assert tok.pad_token is None and tok.padding_side == side
    second = evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    assert (first.cache_status, second.cache_status) == ("miss", "hit")
    assert first.predictions == _truth(0, qa_rows)  # eos padding answers like the pad token did


def test_batches_never_mutate_and_match_the_tokenizers_own_padding():
    from hf_cachehooks._models.extraction import batches
    from hf_cachehooks._models.runners import encode_batch

    texts = ["what is the capital of france ?", "yes", "two plus"]
    tok = make_tokenizer()
    for side in ("left", "right"):
        ours = encode_batch(tok, texts, side=side)
        theirs = tok(texts, padding=True, padding_side=side, return_tensors="pt")
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    bare = _no_pad_tokenizer()
    _, batch = next(batches(texts, bare, 3))
    assert bare.pad_token is None
    assert batch["input_ids"][1, -1].item() == bare.eos_token_id and batch["attention_mask"][1].tolist() == [
        1,
        0,
        0,
        0,
        0,
        0,
        0,
    ]


def test_classify_without_any_pad_id_changes_neither_model_nor_tokenizer():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from hf_cachehooks._models.runners import classify

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_labels=3,
            pad_token_id=None,
        )
    ).eval()
    tok = _no_pad_tokenizer()
    texts = ["what is the capital of france ?", "yes", "is the sky green ?"]
    labels = classify(model, tok, texts, EvalConfig(task="classification"))
    assert model.config.pad_token_id is None and tok.pad_token is None
    with torch.no_grad():
        alone = [model(**tok([t], return_tensors="pt")).logits.argmax(-1).item() for t in texts]
    assert labels == alone


# Full disk (ENOSPC) -------------------------------------------------------------------------------


def _fill(folder: Path) -> None:
    try:
        with open(folder / "filler", "wb", buffering=0) as handle:
            while True:
                handle.write(b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC


@contextlib.contextmanager
def _tmpfs_full(folder: Path):
    """A 256 KiB tmpfs at `folder`, filled to the last byte; None when this machine cannot mount one."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = (
        os.geteuid() == 0
        and shutil.which("mount")
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        yield None
        return
    try:
        _fill(folder)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


class _NoSpace(io.RawIOBase):
    """A file under the cache root on a full disk: created, but every write fails with ENOSPC."""

    def __init__(self, real):
        self.real = real

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    def writable(self):
        return True

    def fileno(self):
        return self.real.fileno()

    def close(self):
        self.real.close()
        super().close()


def _patch_full(monkeypatch, folder: Path) -> None:
    """Writes of file content under `folder` fail with ENOSPC, as on a full disk (files can still be created)."""
    real_open = io.open
    inside = str(folder.resolve())

    def where(file) -> str:
        if isinstance(file, int):
            return os.readlink(f"/proc/self/fd/{file}")
        return str(Path(os.fsdecode(file)).resolve())

    def full_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and where(file).startswith(inside):
            return _NoSpace(handle)
        return handle

    monkeypatch.setattr(io, "open", full_open)
    monkeypatch.setattr("builtins.open", full_open)


@pytest.mark.parametrize("full", ["tmpfs", "patched"])
def test_full_disk_finishes_uncached_with_a_warning_and_no_lock_left(
    tmp_path, root, qa_rows, monkeypatch, caplog, full
):
    """ENOSPC everywhere under the cache root: correct predictions, a warning, and the next run does not wait.

    "tmpfs" mounts a real full filesystem where the test may (root with mount rights), else simulates it.
    """
    caplog.set_level(logging.INFO, logger="hf_cachehooks")
    folder = _save(tmp_path / "m", 0)
    truth = _truth(0, qa_rows)
    with contextlib.ExitStack() as stack:
        mounted = stack.enter_context(_tmpfs_full(root)) if full == "tmpfs" else None
        if mounted is None:
            _patch_full(monkeypatch, root)
        runs = []
        for _ in range(2):
            started = time.monotonic()
            result = evaluate_model(str(folder), qa_rows, CFG)
            runs.append((result, time.monotonic() - started))
        leftovers = [p for p in root.rglob("*") if p.suffix == ".lock" or p.name.endswith(".hfch-tmp")]
    for result, seconds in runs:
        assert result.cache_status == "miss" and result.path is None
        assert result.predictions == truth
        assert seconds < 30  # never the 60 s wait for a stale empty lock
    assert leftovers == []
    assert "Cannot write cache" in caplog.text and "Another process is computing" not in caplog.text


@pytest.mark.parametrize(
    "mutate, counted",
    [
        (lambda w: w.data.__setitem__((0, 0), w.data[0, 0] + 1e-3), False),  # an ablation through .data
        (lambda w: w.data.add_(1e-6), False),  # an adapter merged as peft merges it: weight.data += delta
        (lambda w: torch.no_grad()(w.mul_)(1.0 + 1e-6), True),  # in place under no_grad
    ],
)
def test_a_weight_changed_in_place_on_the_same_object_is_a_miss(qa_rows, mutate, counted):
    """Same object, same storage; through `.data` not even the version counter moves: only the bytes tell."""
    model, tok = make_llama(), make_tokenizer()
    evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    weight = model.model.layers[0].mlp.down_proj.weight
    pointer, version = weight.data_ptr(), weight._version
    mutate(weight)
    assert weight.data_ptr() == pointer and (weight._version != version) == counted
    result = evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    assert result.cache_status == "miss" and "model.weights" in result.miss_reason


def test_a_tokenizer_vocab_changed_in_place_on_the_same_object_is_a_miss(qa_rows):
    from tokenizers import models

    model, tok = make_llama(), make_tokenizer()
    evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    vocab["paris"], vocab["blue"] = vocab["blue"], vocab["paris"]  # same size, two ids swapped
    tok.backend_tokenizer.model = models.WordLevel(vocab=vocab, unk_token="<unk>")
    result = evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    assert result.cache_status == "miss" and "tokenizer.vocab" in result.miss_reason


def test_another_reference_field_recomputes_the_metrics_from_the_cached_predictions(tiny, qa_rows):
    model, tok = tiny
    rows = [{**row, "other": "paris"} for row in qa_rows]
    first = evaluate_model(model, rows, CFG, tokenizer=tok)
    other = evaluate_model(model, rows, CFG.with_(reference_field="other"), tokenizer=tok)
    assert other.cache_status == "partial" and other.reused == len(rows)  # nothing predicted again
    assert other.references == ["paris"] * len(rows) and other.key != first.key
    assert other.predictions == first.predictions
    again = evaluate_model(model, rows, CFG, tokenizer=tok)
    assert again.cache_status == "hit" and again.references == [row["answer"] for row in rows]
    assert again.metrics == first.metrics


def test_a_hit_never_shares_its_lists_with_the_next_hit(tiny, qa_rows):
    """Repeated hits parse the entry once per process: the caller's copy must stay the caller's."""
    model, tok = tiny
    first = evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    time.sleep(0.03)  # past the file-time tick, so the parsed entry is remembered (from its second read on)
    for _ in range(4):
        hit = evaluate_model(model, qa_rows, CFG, tokenizer=tok)
        assert hit.cache_status == "hit", hit.miss_reason
        assert hit.predictions == first.predictions and hit.references == first.references
        assert hit.metrics == first.metrics and hit.metadata["dataset_size"] == len(qa_rows)
        hit.predictions[0] = "changed"
        hit.predictions.append("extra")
        hit.references.append("extra")
        hit.metrics["exact_match"] = -1.0
        hit.metadata["dataset_size"] = -1
        assert hit.references[1] is qa_rows[1]["answer"]  # each reference is the row's own, as on a miss


def test_a_remembered_run_entry_changed_on_disk_is_read_again(tiny, qa_rows, caplog):
    """An entry parsed earlier in this process is reused only while the file at its path is the very file."""
    model, tok = tiny
    first = evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    time.sleep(0.03)
    for _ in range(2):
        assert evaluate_model(model, qa_rows, CFG, tokenizer=tok).cache_status == "hit"  # now remembered
    from hf_cachehooks._core import entry

    assert entry._parsed[first.path][1] is not None
    path = Path(first.path)
    raw = path.read_bytes()
    st = path.stat()
    damaged = raw.replace(orjson.dumps(first.predictions[0]), orjson.dumps("x" * len(first.predictions[0])), 1)
    assert len(damaged) == len(raw) and damaged != raw
    with open(path, "r+b") as handle:  # the same inode and size, rewritten in place, times put back
        handle.write(damaged)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with caplog.at_level(logging.WARNING):
        again = evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    assert again.cache_status != "hit" and "Corrupt cache entry" in caplog.text
    assert again.predictions == first.predictions


# Issue 23 -------------------------------------------------------------------------------------------
# 7. the model's mode: every run is in eval mode, and the caller's mode is given back


def _dropout_gpt2(head: str = "causal"):
    """A tiny GPT-2 whose dropout (0.5 everywhere) changes every answer in train mode."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64,
        n_positions=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.5,
        embd_pdrop=0.5,
        attn_pdrop=0.5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        num_labels=3,
    )
    return (GPT2LMHeadModel if head == "causal" else GPT2ForSequenceClassification)(config).eval()


def _train_mode_but_one_block(model):
    """As the Trainer leaves a model after `train()`, with one block the caller froze in eval mode."""
    model.train()
    model.transformer.h[0].eval()
    return model


def _mode_as_left(model) -> bool:
    return model.training and not model.transformer.h[0].training and model.transformer.h[1].training


@pytest.mark.parametrize("task", ["generation", "classification"])
def test_a_model_in_train_mode_is_run_in_eval_mode_and_given_back_as_it_came(qa_rows, task):
    """Finding 7: predictions made with dropout on were cached, then served to the same model in eval mode."""
    config = (
        CFG.with_(max_new_tokens=8)
        if task == "generation"
        else EvalConfig(task="classification", input_field="question", reference_field="label", metrics=("accuracy",))
    )
    rows = [{**r, "label": i % 3} for i, r in enumerate(qa_rows)]
    model, tok = _dropout_gpt2("causal" if task == "generation" else "classification"), make_tokenizer()
    truth = evaluate_model(model, rows, config.with_(use_prediction_cache=False), tokenizer=tok).predictions
    first = evaluate_model(_train_mode_but_one_block(model), rows, config, tokenizer=tok)
    assert first.predictions == truth and _mode_as_left(model)
    model.eval()
    again = evaluate_model(model, rows, config, tokenizer=tok)
    assert again.cache_status == "hit" and again.predictions == truth
    assert again.key == first.key  # the key names the mode the answers were made in: eval, both times


def test_activations_and_server_decoding_run_in_eval_mode_too():
    from hf_cachehooks._models.extraction import capture
    from hf_cachehooks._models.runners import encode_batch
    from hf_cachehooks.generation.decoding import Settings, decode

    model, tok = _dropout_gpt2(), make_tokenizer()
    texts = ["what is the capital of france ?", "is the sky blue ?"]
    batch = encode_batch(tok, texts)
    settings = Settings(max_tokens=6, temperature=0)
    with torch.no_grad():
        hidden = capture(model, batch, [1, 2])
        text = [row.text for row in list(decode(model, tok, texts, settings))[-1]]
    _train_mode_but_one_block(model)
    with torch.no_grad():
        for layer, states in capture(model, batch, [1, 2]).items():
            assert torch.equal(states, hidden[layer])
    assert _mode_as_left(model)
    steps = decode(model, tok, texts, settings)
    next(steps)
    assert _mode_as_left(model)  # between two streamed tokens the model is the caller's
    assert [row.text for row in list(steps)[-1]] == text and _mode_as_left(model)


def test_conversation_turns_and_their_lens_run_in_eval_mode_too():
    """The chat server's turns, the hidden states they store and the lens read from them: dropout off."""
    from hf_cachehooks.conversation.lens import generate_turn

    model, tok = _dropout_gpt2(), make_tokenizer()
    ids = torch.tensor([tok("what is the capital of france ?")["input_ids"]])
    truth = generate_turn(model, tok, ids, 0, max_new_tokens=4, k=3)
    served = generate_turn(_train_mode_but_one_block(model), tok, ids, 0, max_new_tokens=4, k=3)
    assert _mode_as_left(model)
    assert served.text == truth.text and (served.token_ids == truth.token_ids).all()
    assert (served.hidden == truth.hidden).all() and (served.topk_ids == truth.topk_ids).all()


# 8. the tokenizer's truncation and padding settings, changed in place


def test_classification_truncation_settings_changed_in_place_are_a_miss(qa_rows):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_labels=3,
            pad_token_id=0,
        )
    ).eval()
    tok = make_tokenizer()
    rows = [{"text": r["question"], "label": i % 3} for i, r in enumerate(qa_rows)]
    config = EvalConfig(task="classification", input_field="text", reference_field="label", metrics=("accuracy",))
    evaluate_model(model, rows, config, tokenizer=tok)
    for name, value in (("model_max_length", 2), ("truncation_side", "left"), ("padding_side", "left")):
        setattr(tok, name, value)
        served = evaluate_model(model, rows, config, tokenizer=tok)
        assert served.cache_status == "miss" and f"tokenizer.{name}" in served.miss_reason
        fresh = evaluate_model(model, rows, config.with_(force_recompute=True), tokenizer=tok)
        assert served.predictions == fresh.predictions


# 5. max_time: its output is not a function of the key


def test_max_time_is_refused_with_the_fix_and_runs_uncached(tiny, qa_rows):
    from hf_cachehooks.errors import ConfigError

    model, tok = tiny
    timed = CFG.with_(generation_kwargs={"max_time": 0.02})
    with pytest.raises(
        ConfigError,
        match=r"max_time=0\.02 \(from your generation settings\) cannot be cached: "
        r"it stops generation by the clock.*max_new_tokens.*use_prediction_cache",
    ):
        evaluate_model(model, qa_rows, timed, tokenizer=tok)
    assert (
        evaluate_model(model, qa_rows, timed.with_(use_prediction_cache=False), tokenizer=tok).cache_status
        == "disabled"
    )
    import copy

    own = copy.deepcopy(model)
    own.generation_config.max_time = 30.0
    with pytest.raises(ConfigError, match=r"max_time=30 \(from the model's generation_config\).*max_time=None"):
        evaluate_model(own, qa_rows, CFG, tokenizer=tok)
    dropped = evaluate_model(own, qa_rows, CFG.with_(generation_kwargs={"max_time": None}), tokenizer=tok)
    assert dropped.cache_status == "miss" and dropped.predictions == _truth(0, qa_rows)


# 15. a tokenizer passed with a model path


def test_a_tokenizer_given_with_a_model_path_is_refused(tmp_path, qa_rows):
    from hf_cachehooks.errors import ConfigError

    folder = _save(tmp_path / "m", 0)
    for config in (CFG, CFG.with_(use_prediction_cache=False)):
        with pytest.raises(
            ConfigError,
            match=r"model path '.*m' and tokenizer=\w+: a model "
            r"given by path loads its own tokenizer\. Pass the loaded model object",
        ):
            evaluate_model(str(folder), qa_rows, config, tokenizer=make_tokenizer())
    assert evaluate_model(str(folder), qa_rows, CFG).predictions == _truth(0, qa_rows)
