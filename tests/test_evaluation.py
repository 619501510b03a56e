"""evaluate_model + prediction cache: key sensitivity, reuse, expiry, robustness (tiny random models)."""

import copy
import logging
import pickle
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import hf_cachehooks._models.loading as loading
import hf_cachehooks._models.runners as runners
from hf_cachehooks import CacheConfig, EvalConfig, evaluate_model
from hf_cachehooks.errors import ConfigError
from tests.conftest import make_llama, make_tokenizer

CFG = EvalConfig(max_new_tokens=4, batch_size=2, metrics=("exact_match", "contains_answer"))


@pytest.fixture
def calls(monkeypatch):
    """Counts examples actually sent to the model."""
    counter = {"generate": 0, "classify": 0}

    def counting(name, real):
        def wrapper(model, tokenizer, prompts, config):
            counter[name] += len(prompts)
            return real(model, tokenizer, prompts, config)

        return wrapper

    monkeypatch.setattr(runners, "generate", counting("generate", runners.generate))
    monkeypatch.setattr(runners, "classify", counting("classify", runners.classify))
    return counter


def test_second_run_is_a_hit_with_same_results(tiny, qa_rows, calls, caplog_info):
    model, tok = tiny
    first = evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    second = evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    assert (first.cache_status, second.cache_status) == ("miss", "hit")
    assert second.from_cache and not first.from_cache
    assert second.predictions == first.predictions and second.metrics == first.metrics
    assert calls["generate"] == len(qa_rows)
    assert "No valid cache found" in caplog_info.text and "Loaded predictions from cache" in caplog_info.text
    assert set(second.metadata) >= {"model_name", "dataset_size", "timestamp", "evaluation_time_seconds"}
    doc = Path(second.path).read_text()
    assert '"predictions"' in doc and '"references"' in doc and '"metrics"' in doc


def _perturbed(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters())[0, 0] += 1e-3
    return other


def _peft(model, r):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=r, target_modules=["q_proj"], lora_alpha=8))


def _tokenizer_with(**settings):
    tok = make_tokenizer()
    for name, value in settings.items():
        setattr(tok, name, value)
    return tok


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda m, t, c: (_perturbed(m), t, c), "model.weights"),
        (lambda m, t, c: (copy.deepcopy(m).to(torch.bfloat16), t, c), "model.dtype"),
        (lambda m, t, c: (_peft(m, 2), t, c), "model.adapter"),
        (lambda m, t, c: (m, make_tokenizer(extra_words=["zebra"]), c), "tokenizer.vocab"),
        (
            lambda m, t, c: (
                m,
                make_tokenizer(chat_template="{{ messages[0]['content'] }}"),
                c.with_(use_chat_template=True),
            ),
            "tokenizer.chat_template",
        ),
        (lambda m, t, c: (m, t, c.with_(max_new_tokens=5)), "generation.max_new_tokens"),
        (lambda m, t, c: (m, t, c.with_(do_sample=True, temperature=0.7)), "generation.do_sample"),
        (
            lambda m, t, c: (m, t, c.with_(generation_kwargs={"repetition_penalty": 1.3})),
            "generation.repetition_penalty",
        ),
        (lambda m, t, c: (m, t, c.with_(generation_kwargs={"num_beams": 2})), "generation.num_beams"),
        (lambda m, t, c: (m, _tokenizer_with(model_max_length=48), c), "tokenizer.model_max_length"),
        (lambda m, t, c: (m, _tokenizer_with(truncation_side="left"), c), "tokenizer.truncation_side"),
        (lambda m, t, c: (m, _tokenizer_with(padding_side="left"), c), "tokenizer.padding_side"),
        (lambda m, t, c: (m, t, c.with_(generation_kwargs={"use_cache": False})), "generation.use_cache"),
        (lambda m, t, c: (m, t, c.with_(generation_kwargs={"low_memory": True})), "generation.low_memory"),
        (lambda m, t, c: (m, t, c.with_(prompt_template="Q: {question} A:")), "prompt.template"),
        (lambda m, t, c: (m, t, c.with_(system_prompt="Be brief.", use_chat_template=True)), "prompt.system_prompt"),
    ],
)
def test_anything_that_can_change_an_answer_misses(tiny, qa_rows, calls, caplog_info, change, field):
    model, tok = tiny
    evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    model2, tok2, cfg2 = change(model, tok, CFG)
    result = evaluate_model(model2, qa_rows, cfg2, tokenizer=tok2)
    assert result.cache_status == "miss"
    assert calls["generate"] == 2 * len(qa_rows)
    assert field in caplog_info.text  # the miss names the changed field


def test_sampling_settings_change_key_only_when_sampling(tiny, qa_rows, calls):
    model, tok = tiny
    evaluate_model(model, qa_rows, CFG.with_(do_sample=True, temperature=0.7), tokenizer=tok)
    assert (
        evaluate_model(model, qa_rows, CFG.with_(do_sample=True, temperature=0.9), tokenizer=tok).cache_status == "miss"
    )
    evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    # greedy decoding ignores temperature: same predictions, so a hit
    assert evaluate_model(model, qa_rows, CFG.with_(temperature=0.3), tokenizer=tok).from_cache


def test_the_same_weights_from_another_revision_share_the_entry(tmp_path, qa_rows, calls, caplog_info):
    """Where a model came from (name, revision) is shown, never keyed: the same weights compute the same."""
    from transformers import AutoModelForCausalLM

    model, tok = make_llama(), make_tokenizer()
    snaps = []
    for sha in ("a" * 40, "b" * 40):
        snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / sha
        model.save_pretrained(snap)
        snaps.append(snap)
    first, second = (
        evaluate_model(AutoModelForCausalLM.from_pretrained(snap), qa_rows, CFG, tokenizer=tok) for snap in snaps
    )
    assert (first.cache_status, second.cache_status) == ("miss", "hit") and first.key == second.key
    assert calls["generate"] == len(qa_rows) and first.metadata["model_name"] == "org/tiny"
    other = make_llama(seed=1)
    other.save_pretrained(snaps[1])  # other weights at that revision: a miss naming the weights
    third = evaluate_model(AutoModelForCausalLM.from_pretrained(snaps[1]), qa_rows, CFG, tokenizer=tok)
    assert third.cache_status == "miss" and "model.weights" in caplog_info.text


def test_changed_example_misses_but_reuses_the_others(tiny, qa_rows, calls):
    model, tok = tiny
    evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    rows = [dict(r) for r in qa_rows]
    rows[2]["question"] = "what color is the sea ?"
    result = evaluate_model(model, rows, CFG, tokenizer=tok)
    assert result.cache_status == "partial" and result.reused == len(rows) - 1
    assert calls["generate"] == len(rows) + 1


def test_changed_reference_recomputes_metrics_without_predicting(tiny, qa_rows, calls):
    model, tok = tiny
    first = evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    rows = [dict(r) for r in qa_rows]
    rows[0]["answer"] = first.predictions[0]
    result = evaluate_model(model, rows, CFG, tokenizer=tok)
    assert calls["generate"] == len(rows)
    assert result.metrics["exact_match"] >= 1 / len(rows)


def test_subset_and_superset_reuse(tiny, qa_rows, calls):
    model, tok = tiny
    evaluate_model(model, qa_rows[:3], CFG, tokenizer=tok)
    assert evaluate_model(model, qa_rows[:2], CFG, tokenizer=tok).reused == 2
    bigger = evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    assert bigger.reused == 3 and calls["generate"] == 3 + 2


def test_metric_change_recomputes_from_cached_predictions(tiny, qa_rows, calls, caplog_info):
    model, tok = tiny
    evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    result = evaluate_model(model, qa_rows, CFG.with_(metrics=("exact_match",)), tokenizer=tok)
    assert result.from_cache and set(result.metrics) == {"exact_match"}
    assert calls["generate"] == len(qa_rows)
    assert "Metrics changed" in caplog_info.text


@pytest.mark.parametrize("cfg", [CFG.with_(batch_size=1), CFG.with_(device="cpu"), CFG.with_(batch_size=5)])
def test_run_settings_do_not_change_the_key(tiny, qa_rows, calls, cfg):
    model, tok = tiny
    evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    assert evaluate_model(model, qa_rows, cfg, tokenizer=tok).from_cache


def test_row_dict_order_and_dataset_objects(tiny, qa_rows, calls):
    model, tok = tiny
    evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    reordered = [dict(reversed(list(r.items()))) for r in qa_rows]
    assert evaluate_model(model, reordered, CFG, tokenizer=tok).from_cache
    datasets = pytest.importorskip("datasets")
    rows = [{"question": r["question"], "answer": str(r["answer"])} for r in qa_rows]
    ds = datasets.Dataset.from_list(rows)
    assert evaluate_model(model, ds, CFG, tokenizer=tok).cache_status == "partial"
    assert evaluate_model(model, ds, CFG, tokenizer=tok).from_cache


def test_moving_the_cache_dir_keeps_hits(tiny, qa_rows, tmp_path, monkeypatch, calls):
    model, tok = tiny
    evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    shutil.move(tmp_path / "cache", tmp_path / "moved")
    monkeypatch.setenv("HF_CACHEHOOKS_HOME", str(tmp_path / "moved"))
    assert evaluate_model(model, qa_rows, CFG, tokenizer=tok).from_cache


def test_expiry_with_fake_clock(tiny, qa_rows, calls):
    model, tok = tiny
    now = [1_000_000.0]
    cfg = CFG.with_(cache=CacheConfig(clock=lambda: now[0], max_age=timedelta(days=30)))
    evaluate_model(model, qa_rows, cfg, tokenizer=tok)
    now[0] += 29 * 86400
    assert evaluate_model(model, qa_rows, cfg, tokenizer=tok).from_cache
    now[0] += 2 * 86400
    assert evaluate_model(model, qa_rows, cfg, tokenizer=tok).cache_status == "miss"  # shards expired too
    assert calls["generate"] == 2 * len(qa_rows)


def test_force_recompute_predicts_again(tiny, qa_rows, calls, caplog_info):
    model, tok = tiny
    evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    result = evaluate_model(model, qa_rows, CFG.with_(force_recompute=True), tokenizer=tok)
    assert result.cache_status == "recomputed" and calls["generate"] == 2 * len(qa_rows)
    assert "Force recompute enabled" in caplog_info.text
    assert evaluate_model(model, qa_rows, CFG, tokenizer=tok).from_cache


def test_cache_disabled(tiny, qa_rows, calls, tmp_path):
    model, tok = tiny
    result = evaluate_model(model, qa_rows, CFG.with_(use_prediction_cache=False), tokenizer=tok)
    assert result.cache_status == "disabled" and not (tmp_path / "cache").exists()


def test_crash_resumes_from_finished_batches(tiny, qa_rows, monkeypatch):
    model, tok = tiny
    real, done = runners.generate, []

    def dying(model, tokenizer, prompts, config):
        if len(done) == 2:
            raise KeyboardInterrupt("killed at 80%")
        done.append(len(prompts))
        return real(model, tokenizer, prompts, config)

    monkeypatch.setattr(runners, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    monkeypatch.setattr(runners, "generate", real)
    result = evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    assert result.cache_status == "partial" and result.reused == 4


def test_corrupt_entry_warns_and_recomputes(tiny, qa_rows, calls, caplog_info):
    model, tok = tiny
    first = evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    path = Path(first.path)
    path.write_bytes(path.read_bytes().replace(b'"predictions"', b'"predictionz"'))
    again = evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    assert not again.from_cache and again.predictions == first.predictions
    assert any(r.levelno == logging.WARNING and "Corrupt cache entry" in r.message for r in caplog_info.records)


def test_unwritable_cache_dir_still_evaluates(tiny, qa_rows, calls, caplog_info):
    model, tok = tiny
    result = evaluate_model(model, qa_rows, CFG.with_(cache=CacheConfig(root="/proc/hf_cachehooks_ro")), tokenizer=tok)
    assert result.cache_status == "miss" and len(result.predictions) == len(qa_rows) and result.path is None
    assert "not cached" in caplog_info.text or "Cannot" in caplog_info.text


def test_hit_path_never_unpickles(tiny, qa_rows, monkeypatch):
    model, tok = tiny
    evaluate_model(model, qa_rows, CFG, tokenizer=tok)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used on a cache read path")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert evaluate_model(model, qa_rows, CFG, tokenizer=tok).from_cache


def test_package_source_has_no_pickle():
    source = (
        "\n".join(p.read_text() for p in Path("hf_cachehooks").rglob("*.py"))
        if Path("hf_cachehooks").exists()
        else "\n".join(p.read_text() for p in Path(__file__).parents[1].joinpath("hf_cachehooks").rglob("*.py"))
    )
    for banned in ("import pickle", "pickle.load", "allow_pickle=True", "torch.load("):
        assert banned not in source


def test_path_model_hit_does_not_load_weights(tmp_path, qa_rows, monkeypatch, calls):
    model, tok = make_llama(), make_tokenizer()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    first = evaluate_model(str(tmp_path / "tiny"), qa_rows, CFG)
    assert first.cache_status == "miss"

    def no_load(*args, **kwargs):
        raise AssertionError("weights loaded on a hit")

    monkeypatch.setattr(loading, "load_model", no_load)
    monkeypatch.setattr(loading, "load_weights", no_load)  # what the load plan calls
    second = evaluate_model(str(tmp_path / "tiny"), qa_rows, CFG)
    assert second.from_cache and second.predictions == first.predictions
    # the same weights passed as an object share the entry
    from transformers import AutoModelForCausalLM, AutoTokenizer

    obj = evaluate_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "tiny"),
        qa_rows,
        CFG,
        tokenizer=AutoTokenizer.from_pretrained(tmp_path / "tiny"),
    )
    assert obj.from_cache


def test_classification_task(qa_rows, calls):
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
            num_labels=2,
            pad_token_id=0,
        )
    ).eval()
    rows = [{"text": r["question"], "label": i % 2} for i, r in enumerate(qa_rows)]
    cfg = EvalConfig(
        task="classification", input_field="text", reference_field="label", metrics=("accuracy", "macro_f1")
    )
    first = evaluate_model(model, rows, cfg, tokenizer=make_tokenizer())
    assert all(p in (0, 1) for p in first.predictions) and 0 <= first.metrics["accuracy"] <= 1
    assert evaluate_model(model, rows, cfg, tokenizer=make_tokenizer()).from_cache
    assert calls["classify"] == len(rows)


def test_clear_errors_name_the_fix(tiny, qa_rows):
    model, tok = tiny
    with pytest.raises(ConfigError, match="reference_field"):
        evaluate_model(model, qa_rows, CFG.with_(reference_field="gold"), tokenizer=tok)
    with pytest.raises(ConfigError, match="Available"):
        evaluate_model(model, qa_rows, CFG.with_(metrics=("bleu9",)), tokenizer=tok)
    with pytest.raises(ConfigError, match="tokenizer="):
        evaluate_model(model, qa_rows, CFG)
    with pytest.raises(ConfigError, match="task="):
        EvalConfig(task="regression")


def test_force_recompute_replaces_per_example_predictions(tiny, qa_rows, monkeypatch):
    model, tok = tiny
    evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    monkeypatch.setattr(runners, "generate", lambda m, t, prompts, c: ["v2"] * len(prompts))
    evaluate_model(model, qa_rows, CFG.with_(force_recompute=True), tokenizer=tok)
    subset = evaluate_model(model, qa_rows[:3], CFG, tokenizer=tok)  # served per example after compaction
    assert subset.cache_status == "partial" and subset.predictions == ["v2"] * 3


def test_a_miss_is_explained_from_the_heads_of_run_entries(tiny, qa_rows, calls, monkeypatch):
    import hf_cachehooks.evaluation.predictions as predictions

    model, tok = tiny
    first = evaluate_model(model, qa_rows, CFG, tokenizer=tok)
    second = evaluate_model(model, qa_rows, CFG.with_(max_new_tokens=9), tokenizer=tok)
    opened = []
    real = predictions.open_entry
    monkeypatch.setattr(predictions, "open_entry", lambda path, **kw: opened.append(str(path)) or real(path, **kw))
    result = evaluate_model(model, qa_rows, CFG.with_(max_new_tokens=8), tokenizer=tok)
    reason = result.miss_reason  # either entry is one field away: the reason names it
    assert "generation.max_new_tokens 9→8" in reason or "generation.max_new_tokens 4→8" in reason, reason
    assert first.path not in opened and second.path not in opened  # explained from their heads alone


def test_predictor_key_memo_follows_the_identity_object_and_every_setting():
    """The predictor key is remembered against the very identity object and the settings: a new identity
    (its memo changed) or any changed setting, even one changed in place inside the config, is a new key."""
    from hf_cachehooks.evaluation.runs import predictor_key

    ident = {"model": {"name": "m", "weights": "a"}, "tokenizer": None, "generation_defaults": {"do_sample": False}}
    config = EvalConfig(max_new_tokens=4, generation_kwargs={"num_beams": 1})
    first = predictor_key(ident, config)
    assert predictor_key(ident, config) is first  # remembered: nothing walked again
    same = copy.deepcopy(ident)
    assert predictor_key(same, config) == first  # another object, same content: same key
    other = copy.deepcopy(ident)
    other["model"]["weights"] = "b"
    assert predictor_key(other, config).digest != first.digest
    config.generation_kwargs["num_beams"] = 2  # changed in place inside the (frozen) config
    beams = predictor_key(ident, config)
    assert beams.digest != first.digest and beams.inputs["generation"]["num_beams"] == 2
    seen = (first.digest, beams.digest)
    assert predictor_key(ident, config.with_(prompt_template="Q: {question}")).digest not in seen
    assert predictor_key(ident, config.with_(max_new_tokens=5)).digest not in seen
