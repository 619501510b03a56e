"""Trainer speed-ups on CPU: the plan, the attention fallback, compile, fused AdamW, the verifying callback."""

import json
import logging

import pytest
import torch

from hf_cachehooks.training import speedups
from hf_cachehooks.training.callbacks import SpeedupCallback
from hf_cachehooks.training.capabilities import Availability
from hf_cachehooks.training.config import SpeedupConfig
from hf_cachehooks.training.devices import DEVICES
from tests.conftest import make_llama, make_tokenizer

TEXTS = [
    "what is the capital of france ? paris",
    "what is two plus two ? four",
    "is the sky blue ? yes",
    "is the sky green ? no",
    "what color is the sky ? blue",
    "two plus four",
] * 4  # 24: full batches of 4


@pytest.fixture
def tiny_dir(tmp_path):
    make_llama(layers=2).save_pretrained(tmp_path / "tiny")
    make_tokenizer().save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def _train(model, plan, tmp_path, steps=6, args_override=None, callback_kwargs=None):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    tok = make_tokenizer()
    data = Dataset.from_dict({"text": TEXTS}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    kwargs = {**plan.training_args_kwargs(), **(args_override or {})}
    args = TrainingArguments(
        str(tmp_path / "out"), max_steps=steps, report_to=[], save_strategy="no", logging_steps=2, **kwargs
    )
    callback = SpeedupCallback(plan, warmup_steps=2, **(callback_kwargs or {}))
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=plan.data_collator(tok), callbacks=[callback]
    )
    trainer.train()
    return trainer, callback


def test_cpu_plan_refuses_bf16_and_tf32_with_reasons():
    plan = speedups.plan(SpeedupConfig(precision="bf16", tf32=True))
    by = {d.setting: d for d in plan.decisions}
    assert by["precision"].chosen == "fp32" and not by["precision"].active and "CPU" in by["precision"].reason
    assert not by["tf32"].active and "Ampere" in by["tf32"].reason
    assert by["optimizer"].chosen == "adamw_torch_fused"  # fused AdamW runs on CPU
    kwargs = plan.training_args_kwargs()
    assert kwargs["bf16"] is False and "tf32" not in kwargs and kwargs["use_cpu"] is True


def test_flash_attention_falls_back_through_a_real_import_error(tiny_dir, caplog):
    caplog.set_level(logging.INFO, logger="hf_cachehooks")
    plan = speedups.plan(
        SpeedupConfig(), device=DEVICES["a100"], available=Availability(flash_attn=True, flash_attn_reason="pretend")
    )
    assert plan.chosen("attn_implementation") == "flash_attention_2"
    model = speedups.load_model(tiny_dir, plan)  # flash_attn is not installed here: transformers raises
    assert plan.attention_used == "sdpa" and model.config._attn_implementation == "sdpa"
    assert "flash_attention_2 failed" in caplog.text and plan.notes and "flash_attention_2 failed" in plan.notes[0]


def test_callback_verifies_fused_adamw_and_reports_steady_throughput(tiny_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hf_cachehooks")
    plan = speedups.plan(SpeedupConfig(per_device_train_batch_size=4))
    trainer, callback = _train(speedups.load_model(tiny_dir, plan), plan, tmp_path)
    assert callback.observed["optimizer"] == "adamw_torch_fused"
    assert (
        trainer.optimizer.optimizer.defaults["fused"] is True
        if hasattr(trainer.optimizer, "optimizer")
        else trainer.optimizer.defaults["fused"] is True
    )
    assert callback.observed["precision"] == "fp32" and callback.observed["attn_implementation"] == "sdpa"
    assert callback.mismatches == []
    assert {s.setting: s.status for s in callback.switches} == {  # planned before: nothing left to switch
        "tf32": "not switched", "attn_implementation": "already on", "torch_compile": "not switched",
        "optimizer": "already on",
    }  # fmt: skip
    assert "Speed-ups in effect" in caplog.text
    report = json.loads((tmp_path / "out" / "speedups_report.json").read_text())
    assert report["throughput"]["steady_steps"] == 4 and report["throughput"]["samples_per_second"] > 0
    assert report["throughput"]["tokens_per_second"] > 0
    assert any("speedups/samples_per_second" in entry for entry in trainer.state.log_history)


def test_a_setting_ignored_by_the_trainer_is_a_warning_naming_the_fix(tiny_dir, tmp_path, caplog):
    plan = speedups.plan(SpeedupConfig(per_device_train_batch_size=4))
    # the user builds TrainingArguments with another optimizer than the plan's; switch=False only reports
    _, callback = _train(
        speedups.load_model(tiny_dir, plan),
        plan,
        tmp_path,
        args_override={"optim": "adamw_torch"},
        callback_kwargs={"switch": False},
    )
    assert any(
        m.startswith("optimizer: planned 'adamw_torch_fused'") and "TrainingArguments(optim" in m
        for m in callback.mismatches
    )
    assert any("optimizer: planned" in r.message and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.slow
def test_compile_with_aot_eager_is_observed_and_recompiles_counted(tiny_dir, tmp_path):
    plan = speedups.plan(
        SpeedupConfig(torch_compile=True, torch_compile_backend="aot_eager", per_device_train_batch_size=4)
    )
    assert plan.chosen("pad_to_multiple_of") == 64  # fixed shapes: no recompiles
    _, callback = _train(speedups.load_model(tiny_dir, plan), plan, tmp_path, steps=5)
    assert callback.observed["torch_compile"] is True and callback.mismatches == []
    assert callback.recompiles == 0


@pytest.mark.slow
def test_inductor_compile_smoke(tiny_dir, tmp_path):
    plan = speedups.plan(SpeedupConfig(torch_compile=True, per_device_train_batch_size=4))
    trainer, callback = _train(speedups.load_model(tiny_dir, plan), plan, tmp_path, steps=4)
    assert callback.observed["torch_compile"] is True and trainer.state.global_step == 4


@pytest.mark.slow
def test_peft_model_with_checkpointing_and_compile_warns_about_graph_breaks(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    plan = speedups.plan(
        SpeedupConfig(
            torch_compile=True,
            torch_compile_backend="eager",
            gradient_checkpointing=True,
            per_device_train_batch_size=4,
        )
    )
    model = peft.get_peft_model(
        speedups.load_model(tiny_dir, plan), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8)
    )
    _, callback = _train(model, plan, tmp_path, steps=4)
    assert callback.observed["gradient_checkpointing"] is True
    assert any("PEFT + gradient checkpointing + torch.compile" in m for m in callback.mismatches)
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for p in lora)  # the adapter really trained


def test_fused_adamw_error_falls_back_to_plain_adamw(tmp_path):
    from transformers import Trainer, TrainingArguments

    plan = speedups.plan(
        SpeedupConfig(),
        available=Availability(flash_attn=False, flash_attn_reason="no GPU", fused_adamw=False, fused_reason="boom"),
    )
    decision = next(d for d in plan.decisions if d.setting == "optimizer")
    assert decision.chosen == "adamw_torch" and "boom" in decision.reason
    assert plan.training_args_kwargs()["optim"] == "adamw_torch"
    args = TrainingArguments(str(tmp_path / "out"), report_to=[], **plan.training_args_kwargs())
    optimizer, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)  # what the Trainer will build
    assert optimizer is torch.optim.AdamW and "fused" not in optimizer_kwargs


def test_load_model_is_the_package_loader_given_the_planned_ladder(tiny_dir, monkeypatch):
    real, calls = speedups.load_weights, []
    monkeypatch.setattr(speedups, "load_weights", lambda *a, **k: calls.append(k) or real(*a, **k))
    plan = speedups.plan(
        SpeedupConfig(), device=DEVICES["a100"], available=Availability(flash_attn=True, flash_attn_reason="pretend")
    )
    assert speedups.load_model(tiny_dir, plan).dtype == torch.float32  # weights stay fp32 by default
    assert calls[0]["attn_implementation"] == ("flash_attention_2", "sdpa", "eager")
    assert speedups.load_model(tiny_dir, plan, dtype="bfloat16").dtype == torch.bfloat16
    assert plan.attention_used == "sdpa"
    assert [note.split(":")[0] for note in plan.notes] == ["flash_attention_2 failed"] * 2  # one per load
