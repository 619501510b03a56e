"""`cache_evaluation`: `trainer.evaluate()` / `trainer.predict()` served from the cache, bit for bit (tiny Llama)."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from hf_cachehooks import CacheConfig, cache_evaluation
from hf_cachehooks._core.keys import diff_inputs
from hf_cachehooks.evaluation.callables import Unknowable, describe
from hf_cachehooks.evaluation.trainer_loop import loop_key
from tests.conftest import make_llama, make_tokenizer

pytest.importorskip("transformers")
TIMING = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")


def rows(n=5, shift=0):
    """Rows of different lengths, so the batch size decides the padding."""
    return [{"input_ids": [1, 4 + (i + shift) % 20, 5, 6 + i % 3][: 2 + i % 3], "labels": None} for i in range(n)]


def _with_labels(data):
    return [{"input_ids": r["input_ids"], "labels": list(r["input_ids"])} for r in data]


def accuracy(prediction):
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"acc": float((logits.argmax(-1) == prediction.label_ids).mean())}


def top_token(prediction):
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"top": int(logits.argmax())}


def make_trainer(tmp_path, model=None, cached=True, data=None, cache=None, trainer_class=None, **settings):
    """A Trainer on a tiny Llama that counts forwards (`trainer.forwards`); `settings` split into args and Trainer."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model = model if model is not None else make_llama()
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    trainer_keys = ("compute_metrics", "preprocess_logits_for_metrics", "compute_loss_func", "data_collator")
    own = {name: settings.pop(name) for name in trainer_keys if name in settings}
    own.setdefault("compute_metrics", accuracy)
    own.setdefault("data_collator", DataCollatorForSeq2Seq(make_tokenizer(), padding=True))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, **{"per_device_eval_batch_size": 2, **settings}
    )
    trainer = (trainer_class or Trainer)(model=model, args=args, eval_dataset=_with_labels(data or rows()), **own)
    trainer.forwards = calls
    return cache_evaluation(trainer, cache or CacheConfig()) if cached else trainer


def same_output(a, b):
    """Bit-for-bit equal arrays (dtype and nesting too), and equal metrics but for timings."""
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_output(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


def metrics_of(output):
    return {k: v for k, v in output.metrics.items() if not k.endswith(TIMING)}


def assert_same(a, b):
    assert same_output(a.predictions, b.predictions)
    assert same_output(a.label_ids, b.label_ids)
    assert metrics_of(a) == metrics_of(b)


def test_second_predict_and_evaluate_run_no_forward_and_match_bit_for_bit(tmp_path):
    plain = make_trainer(tmp_path, cached=False)
    plain.model.config.output_hidden_states = True  # predictions: (logits, (hidden states...)), nested tuples
    reference = plain.predict(_with_labels(rows()))
    trainer = make_trainer(tmp_path)
    trainer.model.config.output_hidden_states = True
    first = trainer.predict(_with_labels(rows()))
    assert trainer.evaluation_loop.last.status == "miss"
    done = trainer.forwards[0]
    assert done > 0
    second = trainer.predict(_with_labels(rows()))
    assert trainer.evaluation_loop.last.status == "hit"
    assert trainer.forwards[0] == done  # no forward on a hit
    for output in (first, second):
        assert_same(output, reference)
    assert isinstance(second.predictions, tuple) and isinstance(second.predictions[1], tuple)
    assert second.predictions[0].dtype == reference.predictions[0].dtype == np.float32
    metrics = trainer.evaluate()  # the same loop under another prefix: a hit, named as evaluate names them
    assert trainer.forwards[0] == done and trainer.evaluation_loop.last.status == "hit"
    assert (
        metrics["eval_loss"] == reference.metrics["test_loss"] and metrics["eval_acc"] == reference.metrics["test_acc"]
    )


def test_a_hit_still_logs_metrics_and_calls_on_evaluate(tmp_path):
    from transformers import TrainerCallback

    seen = []

    class Watch(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append(metrics)

    trainer = make_trainer(tmp_path)
    trainer.add_callback(Watch())
    first, second = trainer.evaluate(), trainer.evaluate()
    assert trainer.evaluation_loop.last.status == "hit"
    assert len(seen) == 2 and seen[1]["eval_acc"] == first["eval_acc"]
    logged = [row for row in trainer.state.log_history if "eval_loss" in row]
    assert len(logged) == 2 and logged[1]["eval_loss"] == first["eval_loss"] == second["eval_loss"]
    assert "eval_runtime" in second  # speed metrics still added around the loop


def test_a_weight_change_misses_and_names_the_weights(tmp_path, caplog_info):
    import torch

    trainer = make_trainer(tmp_path)
    before = trainer.evaluate()
    with torch.no_grad():
        trainer.model.lm_head.weight.add_(0.5)
    done = trainer.forwards[0]
    after = trainer.evaluate()
    assert trainer.evaluation_loop.last.status == "miss"
    assert "model.weights" in trainer.evaluation_loop.last.reason and "model.weights" in caplog_info.text
    assert trainer.forwards[0] > done and after["eval_loss"] != before["eval_loss"]


def test_a_changed_compute_metrics_recomputes_metrics_only(tmp_path, caplog_info):
    make_trainer(tmp_path).evaluate()
    plain = make_trainer(tmp_path, cached=False, compute_metrics=top_token).evaluate()
    trainer = make_trainer(tmp_path, compute_metrics=top_token)
    metrics = trainer.evaluate()
    assert trainer.forwards[0] == 0 and trainer.evaluation_loop.last.status == "hit"
    assert metrics["eval_top"] == plain["eval_top"] and "eval_acc" not in metrics
    assert caplog_info.text.count("compute_metrics changed") == 1
    again = make_trainer(tmp_path, compute_metrics=top_token).evaluate()  # kept with the function that made them
    assert again["eval_top"] == plain["eval_top"] and caplog_info.text.count("compute_metrics changed") == 1


def _dropping_logits(logits, labels):
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)


def _loss_of(outputs, labels, num_items_in_batch=None):
    return outputs["logits"].float().pow(2).mean()


class StepTrainer:  # mixed into Trainer below: a prediction_step of the user's own
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        return loss * 2, logits, labels


def _step_trainer():
    from transformers import Trainer

    return type("MyTrainer", (StepTrainer, Trainer), {})


# Each setting the loop reads that changes its output: (settings, predict() keywords, the key field named).
CHANGES = [
    ({"data": rows(shift=3)}, {}, "data.fingerprint"),
    ({"prediction_loss_only": True}, {}, "loop.prediction_loss_only"),
    ({}, {"ignore_keys": ["hidden_states"]}, "loop.ignore_keys"),
    ({"label_names": ["input_ids"]}, {}, "loop.label_names"),
    ({"include_for_metrics": ["inputs"], "compute_metrics": lambda p: {"n": int(p.inputs.sum())}}, {}, "include"),
    ({"eval_do_concat_batches": False, "compute_metrics": None}, {}, "loop.eval_do_concat_batches"),
    ({"per_device_eval_batch_size": 3}, {}, "loop.eval_batch_size"),
    ({"bf16_full_eval": True}, {}, "loop.full_eval"),
    ({"label_smoothing_factor": 0.2}, {}, "loop.label_smoothing_factor"),
    ({"dataloader_drop_last": True}, {}, "loop.dataloader_drop_last"),
    (
        {"preprocess_logits_for_metrics": _dropping_logits, "compute_metrics": None},
        {},
        "code.preprocess_logits_for_metrics",
    ),
    ({"compute_loss_func": _loss_of}, {}, "code.compute_loss_func"),
    ({"trainer_class": "step"}, {}, "code.trainer"),
]


@pytest.mark.parametrize("settings, call, field", CHANGES, ids=[c[2] for c in CHANGES])
def test_every_setting_that_changes_the_output_misses(tmp_path, settings, call, field):
    settings = dict(settings)
    if settings.get("trainer_class") == "step":
        settings["trainer_class"] = _step_trainer()
    data = _with_labels(settings.pop("data", rows()))
    base = make_trainer(tmp_path)
    base.model.config.output_hidden_states = True
    before = base.predict(_with_labels(rows()))
    variant = make_trainer(tmp_path, **settings)
    variant.model.config.output_hidden_states = True
    after = variant.predict(data, **call)
    status = variant.evaluation_loop.last
    assert status.status == "miss" and variant.forwards[0] > 0, status
    assert field in status.reason
    differs = (
        not same_output(before.predictions, after.predictions)
        or not same_output(before.label_ids, after.label_ids)
        or metrics_of(before) != metrics_of(after)
    )
    assert differs  # the setting really changes what the loop returns: serving the old entry would be wrong


def test_collator_settings_are_keyed(tmp_path):
    from transformers import DataCollatorForSeq2Seq

    make_trainer(tmp_path).evaluate()
    padded = DataCollatorForSeq2Seq(make_tokenizer(), padding="max_length", max_length=6)
    trainer = make_trainer(tmp_path, data_collator=padded)
    trainer.evaluate()
    assert (
        trainer.evaluation_loop.last.status == "miss"
        and "collator.state.padding" in trainer.evaluation_loop.last.reason
    )


# Settings that change the output only on hardware or set-ups a CPU test cannot run cheaply: the key alone.
KEY_ONLY = [
    ({"torch_compile": True}, "loop.torch_compile"),
    ({"eval_accumulation_steps": 1}, "loop.eval_accumulation_steps"),
    ({"logging_nan_inf_filter": False}, "loop.logging_nan_inf_filter"),
    ({"remove_unused_columns": False}, "loop.remove_unused_columns"),
    ({"train_sampling_strategy": "group_by_length"}, "loop.sampling"),
]


@pytest.mark.parametrize("settings, field", KEY_ONLY, ids=[c[1] for c in KEY_ONLY])
def test_settings_the_loop_reads_are_in_the_key(tmp_path, settings, field):
    def key_of(trainer):
        return loop_key(trainer, trainer.get_eval_dataloader(), False, None)[0]

    base, variant = key_of(make_trainer(tmp_path)), key_of(make_trainer(tmp_path, **settings))
    assert base.digest != variant.digest
    assert any(change.startswith(field) for change in diff_inputs(base.inputs, variant.inputs))


def test_a_damaged_array_file_warns_and_recomputes(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="hf_cachehooks")
    trainer = make_trainer(tmp_path)
    first = trainer.predict(_with_labels(rows()))
    path = trainer.evaluation_loop.last.path
    arrays = path.replace(".json", ".safetensors")
    data = bytearray(Path(arrays).read_bytes())
    data[-3] ^= 0xFF
    Path(arrays).write_bytes(bytes(data))
    done = trainer.forwards[0]
    again = trainer.predict(_with_labels(rows()))
    assert trainer.evaluation_loop.last.status == "miss" and trainer.forwards[0] > done
    assert "Corrupt cache entry" in caplog.text
    assert_same(first, again)


def test_expiry_force_recompute_and_disabled(tmp_path):
    now = [1_000_000.0]
    cache = CacheConfig(max_age=timedelta(days=1), clock=lambda: now[0])
    trainer = make_trainer(tmp_path, cache=cache)
    trainer.evaluate()
    trainer.evaluate()
    assert trainer.evaluation_loop.last.status == "hit"
    now[0] += 2 * 86400
    trainer.evaluate()
    assert trainer.evaluation_loop.last.status == "miss"
    cache_evaluation(trainer, CacheConfig(force_recompute=True, clock=lambda: now[0]))
    trainer.evaluate()
    assert trainer.evaluation_loop.last.status == "recomputed"
    cache_evaluation(trainer, CacheConfig(enabled=False))
    done = trainer.forwards[0]
    trainer.evaluate()
    assert trainer.evaluation_loop.last.status == "disabled" and trainer.forwards[0] > done


def test_an_undescribable_collator_is_not_cached(tmp_path):
    from transformers import default_data_collator

    class Slotted:
        __slots__ = ()

        def __call__(self, features):
            return default_data_collator(features)

    trainer = make_trainer(tmp_path, data=[{"input_ids": [1, 4, 5]}] * 4, data_collator=Slotted())
    trainer.evaluate()
    trainer.evaluate()
    last = trainer.evaluation_loop.last
    assert last.status == "not-cached" and "Slotted" in last.reason and trainer.forwards[0] == 4


def test_entries_show_in_ls(tmp_path, root):
    from hf_cachehooks._core.heads import read_summary
    from hf_cachehooks.management import list_entries

    make_trainer(tmp_path).evaluate()
    (info,) = [e for e in list_entries(root) if e.kind == "trainer-eval"]
    assert info.model == "LlamaForCausalLM"
    assert read_summary(info.path).summary["items"] == 5


def test_functions_are_described_by_code_closure_and_globals():
    first, second = (lambda x: x + 1), (lambda x: x + 2)  # one line, one source: the code tells them apart
    assert describe(first) != describe(second)

    def make(scale):
        return lambda p: p * scale

    assert describe(make(1)) == describe(make(1)) != describe(make(2))
    assert describe(accuracy)["function"].endswith("accuracy")
    with pytest.raises(Unknowable, match="torch module"):
        describe(make(make_llama()))
