"""The drop-in `SpeedupCallback()`: speed-ups switched on a built Trainer (hf_cachehooks/training/switches.py).

Every run is a tiny Llama for 4 steps on CPU; numbers are compared step for step against the run planned
before the Trainer was built, and against a plain run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_cachehooks import SpeedupCallback, SpeedupConfig, speedups
from hf_cachehooks.training import switches
from hf_cachehooks.training.capabilities import Availability
from hf_cachehooks.training.devices import DEVICES
from tests.conftest import make_llama, make_tokenizer
from tests.test_speedups import TEXTS

STEPS = 4
FA2 = Availability(flash_attn=True, flash_attn_reason="pretend: smoke test passed")


def _data():
    from datasets import Dataset

    tok = make_tokenizer()
    return tok, Dataset.from_dict({"text": TEXTS}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])


def _fit(tmp_path, model, callbacks=(), optimizers=(None, None), **overrides):
    """Train `model` 4 steps; returns (trainer, per-step losses, final weights)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok, data = _data()
    kwargs = {"optim": "adamw_torch", "per_device_train_batch_size": 4, "use_cpu": True, **overrides}
    args = TrainingArguments(
        str(tmp_path / "out"),
        max_steps=STEPS,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **kwargs,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        optimizers=optimizers,
        callbacks=list(callbacks),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _eager_llama():
    model = make_llama(layers=2).train()
    model.set_attn_implementation("eager")  # what an older checkpoint or an explicit choice gives
    return model


def _by_setting(callback):
    return {s.setting: s for s in callback.switches}


def test_callback_alone_switches_and_matches_the_planned_run_step_for_step(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hf_cachehooks")
    callback = SpeedupCallback(warmup_steps=1)
    trainer, losses, weights = _fit(tmp_path / "a", _eager_llama(), [callback])
    got = _by_setting(callback)
    assert (got["attn_implementation"].before, got["attn_implementation"].after) == ("eager", "sdpa")
    assert (got["optimizer"].before, got["optimizer"].after) == ("AdamW", "adamw_torch_fused")
    assert got["attn_implementation"].status == got["optimizer"].status == "verified"  # the steps really ran them
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert all(g["fused"] for g in optimizer.param_groups) and not optimizer.defaults["fused"]
    assert trainer.model.config._attn_implementation == "sdpa"
    assert "switched by the callback" in caplog.text
    report = json.loads((tmp_path / "a" / "out" / "speedups_report.json").read_text())
    assert {s["setting"]: s["status"] for s in report["switches"]}["optimizer"] == "verified"

    # the same speed-ups chosen before the Trainer existed: sdpa at load, optim="adamw_torch_fused"
    plan = speedups.plan(SpeedupConfig(per_device_train_batch_size=4))
    planned_model = make_llama(layers=2).train()
    planned_model.set_attn_implementation(plan.chosen("attn_implementation"))
    _, planned_losses, planned_weights = _fit(tmp_path / "b", planned_model, optim=plan.chosen("optimizer"))
    assert len(losses) == STEPS and losses == pytest.approx(planned_losses, rel=1e-6)
    for name, value in planned_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-6, atol=1e-7)

    # plain: eager attention, for-loop AdamW; sdpa and the fused kernel only round differently
    _, plain_losses, plain_weights = _fit(tmp_path / "c", _eager_llama())
    assert losses == pytest.approx(plain_losses, rel=1e-4)
    for name, value in plain_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5)


def test_users_own_optimizer_is_left_alone_and_reported(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hf_cachehooks")
    model = _eager_llama()
    own = torch.optim.AdamW(model.parameters(), lr=1e-4)
    callback = SpeedupCallback(warmup_steps=1)
    _fit(tmp_path, model, [callback], optimizers=(own, None))
    got = _by_setting(callback)
    assert got["optimizer"].status == "left alone" and "your own optimizer" in got["optimizer"].reason
    assert not any(g["fused"] for g in own.param_groups)
    assert got["attn_implementation"].after == "sdpa"  # the model is still switched
    assert any(m.startswith("optimizer:") and "your own optimizer" in m for m in callback.mismatches)
    assert "Not switchable now: optimizer:" in caplog.text and "your own optimizer" in caplog.text  # advice


def test_a_switch_the_step_did_not_run_is_undone_with_a_warning(tmp_path, caplog, monkeypatch):
    # a torch whose AdamW ignores the group flag: the step runs the for-loop kernel, so the check fails
    adam = sys.modules[torch.optim.AdamW.__module__.replace("adamw", "adam")]
    monkeypatch.setattr(adam, "_fused_adam", adam._single_tensor_adam)
    callback = SpeedupCallback(warmup_steps=1)
    trainer, losses, _ = _fit(tmp_path, _eager_llama(), [callback])
    optimizer = _by_setting(callback)["optimizer"]
    assert optimizer.status == "undone" and "another AdamW kernel" in optimizer.reason
    assert not any(g["fused"] for g in getattr(trainer.optimizer, "optimizer", trainer.optimizer).param_groups)
    assert any("put back to 'AdamW'" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    assert len(losses) == STEPS


def test_attention_climbs_to_flash_attention_only_in_half_precision_and_falls_back_to_sdpa(caplog):
    plan = speedups.plan(SpeedupConfig(), device=DEVICES["a100"], available=FA2, announce=False)
    assert plan.chosen("attn_implementation") == "flash_attention_2"
    fp32 = switches.switch_attention(_eager_llama(), plan, half_precision=False)
    assert fp32.after == "sdpa" and "needs bf16/fp16" in fp32.reason
    model = _eager_llama()
    half = switches.switch_attention(model, plan, half_precision=True)  # flash_attn is not installed here
    assert half.after == "sdpa" and "flash_attention_2 failed: ImportError" in half.reason
    assert switches.attention_in_effect(model) == {"sdpa"} and half.check is not None and half.check() is None
    half.undo()
    assert switches.attention_in_effect(model) == {"eager"}
    assert (
        switches.switch_attention(
            model, speedups.plan(SpeedupConfig(attn_implementation="eager"), announce=False), True
        ).status
        == "already on"
    )


def test_fused_adamw_is_switched_only_when_every_parameter_qualifies():
    param = torch.nn.Parameter(torch.ones(2))
    assert switches.switch_fused_adamw(torch.optim.SGD([param]), False)[0].reason.startswith("SGD has no fused")
    foreach = switches.switch_fused_adamw(torch.optim.AdamW([param], foreach=True), False)[0]
    assert foreach.status == "not switched" and "foreach=True" in foreach.reason
    resumed = torch.optim.AdamW([param])
    param.grad = torch.ones(2)
    resumed.step()  # a resumed optimizer already has state
    switch, watch = switches.switch_fused_adamw(resumed, False)
    assert switch.status == "switched" and watch is not None
    watch.start()
    resumed.step()
    watch.stop()
    assert switch.check() is None and resumed.state[param]["step"].item() == 2.0
    watch.close()


def test_tf32_switch_sets_reads_back_and_restores_the_new_flag():
    plan = speedups.plan(SpeedupConfig(), device=DEVICES["a100"], available=FA2, announce=False)
    before = torch.backends.fp32_precision
    try:
        switch = switches.switch_tf32(plan)
        assert switch.status == "switched" and switches.tf32_in_effect()  # no error reading it back
        assert switch.check() is None
        switch.undo()
        assert torch.backends.fp32_precision == before and not switches.tf32_in_effect()
    finally:
        torch.backends.fp32_precision = before
    assert switches.switch_tf32(speedups.plan(SpeedupConfig(), announce=False)).status == "not switched"  # CPU


def test_peft_lora_with_gradient_checkpointing_is_switched_and_trains(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_eager_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    callback = SpeedupCallback(warmup_steps=1)
    _fit(tmp_path, model, [callback], activation_checkpointing=True)
    got = _by_setting(callback)
    assert got["attn_implementation"].status == got["optimizer"].status == "verified"
    assert model.get_base_model().config._attn_implementation == "sdpa"
    assert callback.observed["gradient_checkpointing"] is True
    assert not any(m.startswith("gradient_checkpointing") for m in callback.mismatches)  # the user's trade-off
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # the adapter trained


@pytest.mark.slow
def test_compile_in_place_when_asked_and_undone_when_the_backend_fails(tmp_path):
    torch._dynamo.reset()
    callback = SpeedupCallback(SpeedupConfig(torch_compile=True, torch_compile_backend="eager"), warmup_steps=1)
    trainer, losses, _ = _fit(tmp_path / "a", _eager_llama(), [callback])
    compiled = _by_setting(callback)["torch_compile"]
    assert (compiled.after, compiled.status) == (True, "verified")
    assert trainer.model._compiled_call_impl is not None and callback.observed["torch_compile"] is True
    _, plain_losses, _ = _fit(tmp_path / "b", _eager_llama())
    assert losses == pytest.approx(plain_losses, rel=1e-4)

    torch._dynamo.reset()

    def failing(gm, example_inputs):  # a compiler that cannot build this graph (no C++ compiler, old Triton, ...)
        raise RuntimeError("boom")

    torch._dynamo.register_backend(failing, name="hf_cachehooks_test_failing")
    callback = SpeedupCallback(
        SpeedupConfig(torch_compile=True, torch_compile_backend="hf_cachehooks_test_failing"), warmup_steps=1
    )
    trainer, failed_losses, _ = _fit(tmp_path / "c", _eager_llama(), [callback])
    compiled = _by_setting(callback)["torch_compile"]
    assert compiled.status == "undone" and "boom" in compiled.reason and "ran eagerly" in compiled.reason
    assert trainer.model._compiled_call_impl is None  # put back
    assert failed_losses == pytest.approx(plain_losses, rel=1e-4)  # the failed graphs ran eagerly
    torch._dynamo.reset()


DDP_SCRIPT = """
import json, logging, os, sys
sys.path.insert(0, {root!r})
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from tests.test_switches import _eager_llama, _fit
from hf_cachehooks import SpeedupCallback
from pathlib import Path
callback = SpeedupCallback(warmup_steps=1)
trainer, losses, _ = _fit(Path({out!r}), _eager_llama(), [callback], ddp_backend="gloo")
rank = trainer.args.process_index
Path({out!r}, f"rank{{rank}}.json").write_text(json.dumps({{
    "world": trainer.args.world_size, "losses": losses,
    "switches": {{s.setting: [s.after, s.status] for s in callback.switches}}}}))
"""


@pytest.mark.slow
def test_torchrun_two_processes_on_gloo_each_rank_switches_and_the_table_prints_once(tmp_path):
    root = str(Path(__file__).resolve().parent.parent)
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(root=root, out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["world"] == 2
        assert rank["switches"]["attn_implementation"] == ["sdpa", "verified"]
        assert rank["switches"]["optimizer"] == ["adamw_torch_fused", "verified"]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the ranks stay in step
    assert (run.stdout + run.stderr).count("Speed-ups in effect") == 1
