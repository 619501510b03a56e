"""`CachedEvalCallback`: generation metrics in the Trainer's logs, computed once per weights, across a resume."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from hf_cachehooks import CachedEvalCallback, ConfigError, EvalConfig
from tests.conftest import make_llama, make_tokenizer

CONFIG = EvalConfig(max_new_tokens=3, batch_size=8, metrics=("exact_match", "contains_answer"))


def lm_rows(n: int) -> list[dict]:
    """Fixed-length causal-LM rows the default collator stacks."""
    rows = []
    for i in range(n):
        ids = [(i * 7 + j * 3) % 24 + 4 for j in range(8)]
        rows.append({"input_ids": ids, "attention_mask": [1] * 8, "labels": ids})
    return rows


def counted(model) -> list:
    """Count `generate` calls on `model` (one per batch of prompts)."""
    calls: list = []
    real = model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real(*args, **kwargs)

    model.generate = generate
    return calls


def tiny_model():
    model = make_llama(vocab_size=32)
    model.config.architectures = ["LlamaForCausalLM"]  # as from_pretrained leaves it (save_pretrained sets it)
    return model


class Recorder:
    """A `TrainerCallback` recording every `on_log`, as a `report_to` integration receives them."""

    def __init__(self):
        from transformers import TrainerCallback

        class _Rec(TrainerCallback):
            def __init__(self):
                self.logs: list[dict] = []

            def on_log(self, args, state, control, logs=None, **kwargs):
                self.logs.append(dict(logs))

        self.callback = _Rec()


class Killed(Exception):
    pass


def make_trainer(tmp_path, model, rows, *, max_steps=4, save_steps=100, kill_at=None, attach=True, **options):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill_at:
                raise Killed(f"killed at step {kill_at}")

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=max_steps,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=save_steps,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    recorder = Recorder().callback
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=lm_rows(32),
        eval_dataset=lm_rows(2),
        processing_class=make_tokenizer(),
        callbacks=[recorder] + ([Kill()] if kill_at else []),
    )
    callback = CachedEvalCallback(rows, options.pop("config", CONFIG), name="qa", trainer=trainer if attach else None)
    trainer.add_callback(callback)
    return trainer, callback, recorder


def ours(logs: list[dict]) -> list[dict]:
    return [entry for entry in logs if any(k.startswith("eval_qa_") for k in entry)]


def test_metrics_reach_log_history_every_on_log_and_evaluate(tmp_path, qa_rows):
    trainer, callback, recorder = make_trainer(tmp_path, tiny_model(), qa_rows)
    trainer.train()
    logged = ours(trainer.state.log_history)
    assert [entry["step"] for entry in logged] == [2, 4]
    assert set(logged[0]) >= {"eval_qa_exact_match", "eval_qa_contains_answer", "step"}
    assert [entry["eval_qa_exact_match"] for entry in logged] == [
        callback.results[step].metrics["exact_match"] for step in (2, 4)
    ]
    heard = ours(recorder.logs)  # what every report_to integration hears
    assert len(heard) == 2 and heard[0]["eval_qa_exact_match"] == logged[0]["eval_qa_exact_match"]
    metrics = trainer.evaluate()  # the dict metric_for_best_model and EarlyStoppingCallback read
    assert metrics["eval_qa_contains_answer"] == callback.results[4].metrics["contains_answer"]
    assert "eval_loss" in metrics


def test_without_the_trainer_metrics_reach_evaluate_and_the_history_with_a_warning(tmp_path, qa_rows, caplog):
    caplog.set_level(logging.WARNING, logger="hf_cachehooks")
    trainer, _, recorder = make_trainer(tmp_path, tiny_model(), qa_rows, max_steps=2, attach=False)
    trainer.train()
    assert [entry["step"] for entry in ours(trainer.state.log_history)] == [2]
    assert ours(recorder.logs) == []  # the integrations cannot hear them: said once
    assert sum("trainer=trainer" in r.message for r in caplog.records) == 1
    assert "eval_qa_exact_match" in trainer.evaluate()


def test_a_second_evaluation_on_the_same_weights_generates_nothing(tmp_path, qa_rows):
    model = tiny_model()
    calls = counted(model)
    trainer, callback, _ = make_trainer(tmp_path, model, qa_rows, max_steps=2)
    trainer.train()
    assert len(calls) == 1 and callback.results[2].cache_status == "miss"
    first = trainer.evaluate()
    second = trainer.evaluate()
    assert len(calls) == 1 and callback.results[2].cache_status == "hit"
    assert first["eval_qa_exact_match"] == second["eval_qa_exact_match"]


def test_a_weight_change_misses_and_explain_names_the_weights(tmp_path, qa_rows, root):
    import torch

    from hf_cachehooks.management import explain

    model = tiny_model()
    calls = counted(model)
    trainer, callback, _ = make_trainer(tmp_path, model, qa_rows, max_steps=2)
    trainer.train()
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    trainer.evaluate()
    result = callback.results[2]
    assert len(calls) == 2 and result.cache_status == "miss"
    assert "model.weights" in result.miss_reason and "model.config" not in result.miss_reason
    assert any("model.weights" in line for line in explain(root))


def test_the_step_is_kept_out_of_the_key_and_ls_shows_it(tmp_path, qa_rows, root):
    from hf_cachehooks.management import list_entries

    trainer, callback, _ = make_trainer(tmp_path, tiny_model(), qa_rows, max_steps=2)
    trainer.train()
    trainer.state.global_step = 7  # the same weights at another step: a hit
    trainer.evaluate()
    assert callback.results[7].cache_status == "hit" and callback.results[7].metadata["step"] == 2
    runs = [e for e in list_entries(root, "predictions") if e.kind == "predictions"]
    assert [e.model for e in runs] == ["LlamaForCausalLM@step-2"]


def test_resume_after_a_kill_evaluates_no_step_twice(tmp_path, qa_rows):
    """Evaluations every 2 steps, checkpoints every 4: killed at step 7 (evaluated 2, 4, 6; last checkpoint 4),
    the resumed run replays steps 5 and 6 to the very same weights, so step 6 is a hit and only step 8 is new."""
    first = tiny_model()
    calls = counted(first)
    trainer, callback, _ = make_trainer(tmp_path, first, qa_rows, max_steps=8, save_steps=4, kill_at=7)
    with pytest.raises(Killed):
        trainer.train()
    assert sorted(callback.results) == [2, 4, 6] and len(calls) == 3
    assert (tmp_path / "run" / "checkpoint-4").is_dir() and not (tmp_path / "run" / "checkpoint-8").exists()

    second = tiny_model()
    resumed_calls = counted(second)
    trainer, callback, _ = make_trainer(tmp_path, second, qa_rows, max_steps=8, save_steps=4)
    trainer.train(resume_from_checkpoint=True)
    assert {step: r.cache_status for step, r in callback.results.items()} == {6: "hit", 8: "miss"}
    assert len(resumed_calls) == 1  # step 8 only: no step's weights generated twice
    assert [e["step"] for e in ours(trainer.state.log_history)] == [2, 4, 6, 8]  # the checkpoint's history, then


def damage(path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(40)
        handle.write(b"#")


def test_a_damaged_entry_recomputes(tmp_path, qa_rows, root):
    model = tiny_model()
    calls = counted(model)
    trainer, callback, _ = make_trainer(tmp_path, model, qa_rows, max_steps=2)
    trainer.train()
    damage(callback.results[2].path)  # the run entry: remade from the per-example predictions, none generated
    trainer.evaluate()
    assert len(calls) == 1 and callback.results[2].cache_status == "partial" and callback.results[2].reused == 5
    for shard in (root / "predictions" / "examples").rglob("*.json"):
        damage(shard)
    damage(callback.results[2].path)  # and those too: generated again
    metrics = trainer.evaluate()
    assert len(calls) == 2 and callback.results[2].cache_status == "miss"
    assert metrics["eval_qa_exact_match"] == callback.results[2].metrics["exact_match"]
    trainer.evaluate()
    assert len(calls) == 2 and callback.results[2].cache_status == "hit"  # rewritten whole


def direct(model, callback, step=1, tokenizer="default"):
    """One `on_evaluate` as the Trainer makes it; returns the metrics dict it filled, and the state."""
    from transformers import TrainerControl, TrainerState

    state = TrainerState()
    state.global_step = step
    metrics: dict = {"eval_loss": 1.0}
    args = SimpleNamespace(output_dir="run", fsdp=None)
    tokenizer = make_tokenizer() if tokenizer == "default" else tokenizer
    callback.on_evaluate(args, state, TrainerControl(), metrics=metrics, model=model, processing_class=tokenizer)
    return metrics, state


def test_train_mode_and_use_cache_are_given_back_and_generation_uses_the_kv_cache(qa_rows):
    model = tiny_model().train()
    model.config.use_cache = False  # what Trainer.__init__ sets (TrainingArguments.use_cache defaults to False)
    widths = []
    real_forward = model.forward

    def forward(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return real_forward(*args, **kwargs)

    model.forward = forward
    metrics, state = direct(model, CachedEvalCallback(qa_rows, CONFIG, name="qa"))
    assert "eval_qa_exact_match" in metrics and metrics["eval_loss"] == 1.0
    assert all(m.training for m in model.modules()) and model.config.use_cache is False
    assert widths[0] > 1 and widths[1:] == [1] * (len(widths) - 1)  # prompt once, then one token at a time
    assert [e["step"] for e in ours(state.log_history)] == [1]


def test_force_recompute_and_age_expiry_apply_to_these_entries(qa_rows):
    from datetime import timedelta

    from hf_cachehooks import CacheConfig

    now = [1_000_000.0]
    cache = CacheConfig(max_age=timedelta(days=1), clock=lambda: now[0])
    model = tiny_model()
    calls = counted(model)
    callback = CachedEvalCallback(qa_rows, CONFIG.with_(cache=cache), name="qa")
    direct(model, callback)
    direct(model, callback)
    assert len(calls) == 1
    now[0] += 2 * 86400  # two days later: expired
    direct(model, callback)
    assert len(calls) == 2 and callback.results[1].cache_status == "miss"
    forced = CachedEvalCallback(qa_rows, CONFIG.with_(cache=CacheConfig(force_recompute=True)), name="qa")
    direct(model, forced)
    assert len(calls) == 3 and forced.results[1].cache_status == "recomputed"


def test_checkpoints_evaluated_in_training_are_hits_for_eval_checkpoints_without_loading(
    tmp_path, qa_rows, monkeypatch, capsys
):
    """Each save remembers which weights its checkpoint holds: `eval-checkpoints` after training is all hits,
    and no weight is loaded (the live model's entries serve the checkpoints by path)."""
    import json

    from transformers import Trainer, TrainingArguments

    from hf_cachehooks._models import loading
    from hf_cachehooks.cli import main

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=lm_rows(16), processing_class=make_tokenizer())
    callback = CachedEvalCallback(qa_rows, CONFIG, name="qa", on="save", trainer=trainer)
    trainer.add_callback(callback)
    trainer.train()
    assert sorted(callback.results) == [2, 4]
    assert [e["step"] for e in ours(trainer.state.log_history)] == [2, 4]

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(loading, "load_weights", refuse)
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(qa_rows))
    out = tmp_path / "out"
    assert (
        main(["eval-checkpoints", args.output_dir, "--data", str(data), "--max-new-tokens", "3", "--output", str(out)])
        == 0
    )
    doc = json.loads((out / "checkpoints.json").read_text())
    assert [(c["step"], c["cache_status"]) for c in doc["checkpoints"]] == [(2, "hit"), (4, "hit")]
    assert [c["metrics"] for c in doc["checkpoints"]] == [callback.results[s].metrics for s in (2, 4)]


def test_sharded_parameters_are_refused_with_what_to_do(qa_rows):
    from transformers import TrainerControl, TrainerState

    model = tiny_model()
    callback = CachedEvalCallback(qa_rows, CONFIG)
    next(model.parameters()).ds_shape = (32, 16)  # what DeepSpeed ZeRO-3 leaves on a partitioned parameter
    with pytest.raises(ConfigError, match="DeepSpeed ZeRO-3.*eval-checkpoints"):
        callback.on_train_begin(SimpleNamespace(fsdp=None), TrainerState(), TrainerControl(), model=model)
    with pytest.raises(ConfigError, match=r"\(FSDP\)"):
        callback.on_train_begin(
            SimpleNamespace(fsdp="full_shard"), TrainerState(), TrainerControl(), model=tiny_model()
        )
    with pytest.raises(ConfigError, match="DeepSpeed ZeRO-3"):
        direct(model, callback)


def test_wrappers_are_taken_off_and_bad_settings_refused(qa_rows):
    import torch

    from hf_cachehooks.evaluation.trainer_callback import unwrapped

    model = tiny_model()
    assert unwrapped(torch.nn.DataParallel(model)) is model and unwrapped(model) is model
    with pytest.raises(ConfigError, match="on='epoch'"):
        CachedEvalCallback(qa_rows, on="epoch")
    with pytest.raises(ConfigError, match="device='cpu'"):
        CachedEvalCallback(qa_rows, EvalConfig(device="cpu"))
    with pytest.raises(ConfigError, match="processing_class=tokenizer"):
        direct(model, CachedEvalCallback(qa_rows, CONFIG), tokenizer=None)


WORKER = """
import json, os, sys
sys.path.insert(0, os.environ["REPO"])
from transformers import Trainer, TrainingArguments
import hf_cachehooks._models.runners as runners
from hf_cachehooks import CachedEvalCallback
from tests.conftest import make_tokenizer
from tests.test_trainer_callback import CONFIG, lm_rows, tiny_model

rows, out = json.loads(sys.argv[1]), sys.argv[2]
generated = []
real = runners.generate
runners.generate = lambda model, tok, prompts, config: generated.extend(prompts) or real(model, tok, prompts, config)
args = TrainingArguments(output_dir=out, max_steps=2, eval_strategy="steps", eval_steps=2, save_strategy="no",
                         per_device_train_batch_size=2, per_device_eval_batch_size=1, report_to=[], use_cpu=True,
                         disable_tqdm=True, seed=0)
trainer = Trainer(model=tiny_model(), args=args, train_dataset=lm_rows(8), eval_dataset=lm_rows(2),
                  processing_class=make_tokenizer())
callback = CachedEvalCallback(rows, CONFIG.with_(batch_size=2), name="qa", trainer=trainer)
trainer.add_callback(callback)
trainer.train()
metrics = trainer.evaluate()
rank = int(os.environ["RANK"])
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"generated": len(generated), "statuses": [r.cache_status for r in callback.results.values()],
               "ours": [e for e in trainer.state.log_history if "eval_qa_exact_match" in e],
               "metric": metrics["eval_qa_exact_match"]}, f)
"""


@pytest.mark.slow
def test_two_gloo_processes_share_the_rows_and_only_rank_0_logs(tmp_path, qa_rows):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REPO": str(repo), "PYTHONPATH": str(repo)}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
        + [json.dumps(qa_rows), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sum(r["generated"] for r in ranks) == len(qa_rows) and all(r["generated"] for r in ranks)  # shared out
    assert [r["statuses"] for r in ranks] == [["hit"], ["hit"]]  # step 2 again at evaluate(): a hit everywhere
    assert [e["step"] for e in ranks[0]["ours"]] == [2, 2] and ranks[1]["ours"] == []  # rank 0 logs, alone
    assert ranks[0]["metric"] == ranks[1]["metric"]  # every rank's evaluate() holds the metric (best-model checks)
