"""`hf-cachehooks eval-checkpoints` and the bridge from a live model to its saved folder (`_models/saved.py`)."""

import copy
import json
import shutil

import pytest
import torch

import hf_cachehooks._models.loading as loading
from hf_cachehooks import EvalConfig, evaluate_model
from hf_cachehooks._models.identity import (
    files_state,
    generation_defaults,
    model_identity,
    remembered_identity,
    tokenizer_identity,
)
from hf_cachehooks._models.saved import path_load_options, remember_saved_model
from hf_cachehooks.cli import main
from tests.conftest import make_llama, make_tokenizer

CFG = EvalConfig(max_new_tokens=3, batch_size=5, metrics=("exact_match", "contains_answer"))


@pytest.fixture
def loads(monkeypatch):
    """Counts weight loads (what the load plan calls); `loads.refuse = True` makes a load fail the test."""

    class Counter:
        count = 0
        refuse = False

    real = loading.load_weights

    def counting(*args, **kwargs):
        if Counter.refuse:
            raise AssertionError("weights loaded")
        Counter.count += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "load_weights", counting)
    return Counter


def _save(model, folder, tok=None):
    model.save_pretrained(folder)
    (tok or make_tokenizer()).save_pretrained(folder)
    return folder


def _identity_after_loading(folder, config=CFG):
    """What `evaluate_model(folder)` records after loading the folder (`_Run._identity_of_objects`)."""
    model, tok = loading.load_model(str(folder), dtype=path_load_options(config)["dtype"])
    return {
        "model": model_identity(model),
        "tokenizer": tokenizer_identity(tok),
        "generation_defaults": generation_defaults(model),
    }


def _memo(folder, root, config=CFG):
    return remembered_identity(files_state(str(folder), path_load_options(config), root), root)


def _assert_never_lies(model, folder, root, config=CFG):
    """The bridge remembers either nothing or exactly what loading the folder computes; returns what it remembered."""
    remembered = remember_saved_model(model, make_tokenizer(), folder, root, path_load_options(config))
    assert _memo(folder, root, config) == remembered
    if remembered is not None:
        assert remembered == _identity_after_loading(folder, config)
    return remembered


def test_a_saved_checkpoint_is_evaluated_by_path_without_loading(tmp_path, root, qa_rows, loads):
    model, tok = make_llama(seed=1).train(), make_tokenizer()  # as the Trainer leaves it: train mode
    folder = _save(model, tmp_path / "run" / "checkpoint-10", tok)
    remembered = remember_saved_model(model, tok, folder, root, path_load_options(CFG))
    assert remembered is not None and remembered["model"]["name"] == "checkpoint-10"
    assert model.training and model.config._name_or_path == ""  # the live model is left as it was
    live = evaluate_model(model, qa_rows, CFG, tokenizer=tok)  # named as its base: the name is shown, not keyed
    assert live.cache_status == "miss" and model.config._name_or_path == ""
    loads.refuse = True
    by_path = evaluate_model(str(folder), qa_rows, CFG)
    assert by_path.cache_status == "hit" and by_path.key == live.key  # one entry for the object and the path
    # with the memo gone, loading the folder computes the very same identity, so the same key
    shutil.rmtree(root / "identity")
    loads.refuse = False
    again = evaluate_model(str(folder), qa_rows, CFG)
    assert loads.count == 1 and again.cache_status == "hit" and again.key == live.key
    assert _memo(folder, root) == remembered == _identity_after_loading(folder)


def test_tied_embeddings_are_remembered_exactly(tmp_path, root):
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(make_llama().config)
    config.tie_word_embeddings = True
    torch.manual_seed(2)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert _assert_never_lies(model, _save(model, tmp_path / "tied"), root) is not None


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_untied_weights_under_a_tying_config_are_not_remembered(tmp_path, root, shift):
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(make_llama().config)
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config)
    # untied by hand: equal values are tied again by a load (one parameter, not two), different ones are not
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + shift)
    assert _assert_never_lies(model, _save(model, tmp_path / "untied"), root) is None


def test_a_model_cast_to_bfloat16_is_not_remembered(tmp_path, root, loads, qa_rows):
    bf16 = CFG.with_(model_dtype="bfloat16")
    model = make_llama(seed=3).to(torch.bfloat16)  # .to() casts RoPE's inv_freq too; a bf16 load does not
    folder = _save(model, tmp_path / "cast")
    assert remember_saved_model(model, None, folder, root, path_load_options(bf16)) is None
    assert _memo(folder, root, bf16) is None
    assert evaluate_model(str(folder), qa_rows, bf16).cache_status == "miss" and loads.count == 1  # loads: a miss


def test_a_bfloat16_model_as_loaded_is_remembered_exactly(tmp_path, root):
    bf16 = CFG.with_(model_dtype="bfloat16")
    start = _save(make_llama(seed=4), tmp_path / "start")
    model, _ = loading.load_model(str(start), dtype="bfloat16")  # how a bf16 fine-tune starts
    assert _assert_never_lies(model, _save(model, tmp_path / "bf16"), root, bf16) is not None


def test_a_float32_model_loaded_in_another_dtype_is_not_remembered(tmp_path, root):
    model = make_llama(seed=5)
    folder = _save(model, tmp_path / "f32")
    bf16 = CFG.with_(model_dtype="bfloat16")
    assert remember_saved_model(model, None, folder, root, path_load_options(bf16)) is None
    assert _assert_never_lies(model, folder, root) is not None  # in float32 it is


def test_bin_weights_are_not_remembered_but_a_trainers_optimizer_files_are_no_obstacle(tmp_path, root):
    model = make_llama(seed=4)
    folder = _save(model, tmp_path / "checkpoint-3")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):  # what a Trainer adds
        (folder / name).write_bytes(b"not weights")
    assert _assert_never_lies(model, folder, root) is not None
    old = _save(model, tmp_path / "checkpoint-4")
    (old / "pytorch_model.bin").write_bytes(b"weights in a format the bridge does not compare: never remembered")
    assert remember_saved_model(model, make_tokenizer(), old, root, path_load_options(CFG)) is None


def test_a_peft_adapter_is_not_remembered(tmp_path, root):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_llama(seed=6), peft.LoraConfig(r=2, target_modules=["q_proj"], lora_alpha=8))
    folder = _save(model, tmp_path / "adapter")
    assert (folder / "adapter_config.json").is_file()
    assert remember_saved_model(model, None, folder, root) is None
    assert not (root / "identity").exists() or not list((root / "identity").glob("*.json"))


def test_a_folder_changed_after_the_save_is_not_remembered(tmp_path, root):
    model = make_llama(seed=7)
    folder = _save(model, tmp_path / "changed")
    other = make_llama(seed=8)
    other.save_pretrained(folder)  # another model's weights in the folder
    assert remember_saved_model(model, None, folder, root) is None


@pytest.fixture
def run_dir(tmp_path):
    """A Trainer output_dir: checkpoint-10 and checkpoint-20 (different weights), the final model in the folder."""
    run = tmp_path / "run"
    for step, seed in ((20, 12), (10, 11)):  # made out of order: the command sorts by step
        _save(make_llama(seed=seed), run / f"checkpoint-{step}")
    _save(make_llama(seed=12), run)  # the final model: the last checkpoint's weights
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 20}))
    return run


@pytest.fixture
def data(tmp_path, qa_rows):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(qa_rows))
    return path


def _eval(run_dir, data, out, *extra):
    return main(
        ["eval-checkpoints", str(run_dir), "--data", str(data), "--max-new-tokens", "3", "--output", str(out), *extra]
    )


def test_second_call_is_all_hits_without_loading(run_dir, data, tmp_path, loads, capsys):
    assert _eval(run_dir, data, tmp_path / "out") == 0
    first = capsys.readouterr()
    assert loads.count == 3  # every checkpoint and the final model loaded once
    assert "[1/3] checkpoint-10" in first.err and "[3/3] final" in first.err
    doc = json.loads((tmp_path / "out" / "checkpoints.json").read_text())
    assert [(c["step"], c["label"]) for c in doc["checkpoints"]] == [
        (10, "checkpoint-10"),
        (20, "checkpoint-20"),
        (20, "final"),
    ]
    # the final model holds checkpoint-20's weights: loaded once to know them, then that entry is its hit
    assert [c["cache_status"] for c in doc["checkpoints"]] == ["miss", "miss", "hit"]
    assert set(doc["checkpoints"][0]) == {"step", "label", "path", "metrics", "cache_status"}
    assert doc["metrics"] == ["exact_match", "contains_answer"] and doc["higher_is_better"] is True
    png = (tmp_path / "out" / "checkpoints.png").read_bytes()
    assert png.startswith(b"\x89PNG")

    loads.refuse = True  # a second call: identities remembered, run entries there
    assert _eval(run_dir, data, tmp_path / "again") == 0
    second = capsys.readouterr()
    again = json.loads((tmp_path / "again" / "checkpoints.json").read_text())
    assert [c["cache_status"] for c in again["checkpoints"]] == ["hit", "hit", "hit"]
    assert [c["metrics"] for c in again["checkpoints"]] == [c["metrics"] for c in doc["checkpoints"]]
    lines = second.out.splitlines()
    assert lines[0].split() == ["step", "exact_match", "contains_answer", "cache"]
    assert lines[1].split()[0] == "10" and lines[3].startswith("final (20)")
    assert "* best step of each metric (higher is better)" in second.out


def test_checkpoints_saved_in_training_are_hits_without_loading(tmp_path, data, qa_rows, root, loads, capsys):
    run = tmp_path / "run"
    tok = make_tokenizer()
    for step in (10, 20):  # what the training callback does at each save
        model = make_llama(seed=step).train()
        folder = _save(model, run / f"checkpoint-{step}", tok)
        assert remember_saved_model(model, tok, folder, root, path_load_options(EvalConfig())) is not None
        evaluate_model(model, qa_rows, EvalConfig(max_new_tokens=3), tokenizer=tok)
    loads.refuse = True
    assert _eval(run, data, tmp_path / "out") == 0
    doc = json.loads((tmp_path / "out" / "checkpoints.json").read_text())
    assert [c["cache_status"] for c in doc["checkpoints"]] == ["hit", "hit"]
    assert "final" not in capsys.readouterr().out  # no model in the run folder itself


def test_best_step_is_marked_per_metric():
    from hf_cachehooks.cli.checkpoints import best_steps, format_table

    records = [
        {"step": 10, "label": "checkpoint-10", "metrics": {"a": 0.5, "b": 0.9}, "cache_status": "hit"},
        {"step": 20, "label": "checkpoint-20", "metrics": {"a": 0.7, "b": 0.9}, "cache_status": "miss"},
        {"step": 30, "label": "checkpoint-30", "metrics": {"a": 0.6, "b": 0.1}, "cache_status": "miss"},
    ]
    best = best_steps(records, ["a", "b"])
    assert best == {"a": "checkpoint-20", "b": "checkpoint-10"}  # the highest; the earliest of equals
    rows = [line.split() for line in format_table(records, ["a", "b"], best).splitlines()]
    assert rows[1] == ["10", "0.5000", "0.9000*", "hit"] and rows[2] == ["20", "0.7000*", "0.9000", "miss"]
    assert rows[3] == ["30", "0.6000", "0.1000", "miss"]


def test_plot_draws_each_metric(tmp_path):
    pytest.importorskip("matplotlib")
    from hf_cachehooks.evaluation.plots import plot_checkpoints

    records = [{"step": s, "metrics": {"a": s / 100, "b": 0.5}} for s in (10, 20)] + [
        {"step": None, "metrics": {"a": 1.0}}
    ]
    path = plot_checkpoints(records, ["a", "b"], tmp_path / "sub" / "p.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_a_run_dir_without_checkpoints_is_a_clear_error(tmp_path, data, capsys):
    (tmp_path / "empty").mkdir()
    assert _eval(tmp_path / "empty", data, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "No checkpoint-* folder or model in RUN_DIR" in err and "pass the Trainer's output_dir" in err
    assert _eval(tmp_path / "missing", data, tmp_path / "out") == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ('[{"question": ', "is not valid JSON"),
        ("[]", "holds no records"),
        ('[{"q": "x", "answer": "y"}]', "records have no 'question' field"),
        ('{"a": 1}', "does not hold a list of records"),
    ],
)
def test_unreadable_data_is_a_clear_error(tmp_path, run_dir, content, message, capsys, loads):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    assert _eval(run_dir, path, tmp_path / "out") == 2
    assert message in capsys.readouterr().err
    assert loads.count == 0
