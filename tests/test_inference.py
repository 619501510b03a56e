"""The inference load plan: nothing changes on CPU; on a (described) GPU the ladder, bf16 and compile; the key
covers the dtype and nothing else the plan chooses."""

from __future__ import annotations

import json
import sys

import pytest

import hf_cachehooks._models.inference as inference
from hf_cachehooks import EvalConfig, evaluate_model
from hf_cachehooks._models.inference import LoadPlan, in_effect, load_planned, plan_load
from tests.conftest import make_llama, make_tokenizer


@pytest.fixture
def gpu(monkeypatch):
    """Describe a CUDA machine (without one): `bf16` says whether the GPU supports bfloat16."""

    def describe(bf16=True):
        monkeypatch.setattr(inference, "cuda_present", lambda: True)
        monkeypatch.setattr(inference, "_bf16_gpu", lambda: bf16)

    return describe


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "tiny"
    make_llama(seed=5).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_on_cpu_nothing_changes():
    plan = plan_load()
    assert (plan.device, plan.dtype, plan.attention, plan.compile_decode) == ("cpu", "float32", None, False)
    assert plan_load(dtype="bfloat16").dtype == "bfloat16"  # an explicit dtype always wins
    skipped = plan_load(compile_decode=True)
    assert not skipped.compile_decode and any("CUDA" in r for r in skipped.reasons)


def test_on_a_gpu_bf16_the_ladder_and_this_ranks_device(gpu, monkeypatch):
    gpu(bf16=True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    plan = plan_load(compile_decode=True)
    assert (plan.device, plan.dtype, plan.compile_decode) == ("cuda:3", "bfloat16", True)
    assert plan.attention == ("flash_attention_2", "sdpa", "eager")
    assert plan_load(speedups=False).attention is None
    assert plan_load(device="cuda").device == "cuda:3" and plan_load(device="cuda:1").device == "cuda:1"
    fp32 = plan_load(dtype="float32")  # flash-attention needs half precision: start at sdpa, say why
    assert fp32.attention == ("sdpa", "eager") and any("flash_attention_2 needs" in r for r in fp32.reasons)
    gpu(bf16=False)  # e.g. a T4: float32 unless asked
    assert plan_load().dtype == "float32"


def test_cpu_dtype_is_decided_without_importing_torch(tmp_path):
    import subprocess

    code = (
        "import sys; from hf_cachehooks._models.inference import plan_load; p = plan_load(); "
        "print(p.dtype, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["float32", "False"]


def test_a_failed_rung_is_logged_noted_and_the_next_loads(folder, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # no flash-attn: transformers refuses the rung
    plan = LoadPlan("cpu", "float32", ("flash_attention_2", "sdpa", "eager"), False)
    model, tokenizer, took = load_planned(str(folder), plan)
    assert took["attention"] == "sdpa" and took["attention_fallbacks"][0].startswith("flash_attention_2: ")
    assert took["dtype"] == "float32" and took["device"] == "cpu" and tokenizer is not None
    assert "attn_implementation=flash_attention_2 failed" in caplog.text


def test_static_cache_gives_the_same_greedy_answers(folder):
    """The compiled decode step runs on a static KV cache: the same math, so it is not in the key."""
    from hf_cachehooks._models.runners import generate

    config = EvalConfig(max_new_tokens=6)
    prompts = ["what is the capital of france ?", "two plus two ?", "is the sky blue ?"]
    plain, tokenizer, _ = load_planned(str(folder), LoadPlan("cpu", "float32", None, False))
    static, _, took = load_planned(str(folder), LoadPlan("cpu", "float32", None, True))
    assert took["compile_decode"] and not in_effect(plain)["compile_decode"]
    assert generate(static, tokenizer, prompts, config) == generate(plain, tokenizer, prompts, config)


def test_what_took_effect_is_in_the_metadata_and_the_dtype_in_the_key(folder, tmp_path):
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"question": "what is two plus two ?", "answer": "four"}]))
    config = EvalConfig(max_new_tokens=3, metrics=("exact_match",))
    first = evaluate_model(str(folder), str(data), config)
    assert first.metadata["load"]["dtype"] == "float32" and first.metadata["load"]["device"] == "cpu"
    assert first.metadata["load"]["attention"] and first.metadata["load"]["compile_decode"] is False
    same = evaluate_model(str(folder), str(data), config.with_(model_dtype="float32", compile_decode=True))
    assert same.cache_status == "hit"  # None resolves to float32 on CPU; compile cannot change an answer
    other = evaluate_model(str(folder), str(data), config.with_(model_dtype="bfloat16"))
    assert other.cache_status == "miss" and "dtype" in (other.miss_reason or "")
    assert other.metadata["load"]["dtype"] == "bfloat16"


def test_generation_backend_loads_with_the_plan(folder):
    from hf_cachehooks import Sampling, TransformersBackend

    backend = TransformersBackend.from_pretrained(str(folder), batch_size=2)
    assert in_effect(backend.model)["dtype"] == "float32" and backend.batch_size == 2
    assert len(backend.complete(["two plus two ?", "is the sky blue ?", "paris ?"], Sampling(0, 3))) == 3


@pytest.mark.gpu
def test_on_a_real_gpu_the_plan_takes_effect(folder, tmp_path):
    import torch

    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"question": "what is two plus two ?", "answer": "four"}] * 4))
    result = evaluate_model(str(folder), str(data), EvalConfig(max_new_tokens=3, metrics=("exact_match",)))
    load = result.metadata["load"]
    assert load["device"].startswith("cuda")
    assert load["dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    assert load["attention"] in ("flash_attention_2", "sdpa") and len(result.predictions) == 4


def test_cuda_present_reads_the_torch_wheel_once_and_the_environment_on_every_call(monkeypatch):
    """A cache hit asks for the dtype, hence the device: the package metadata is read once per process
    (about 2 ms a read), CUDA_VISIBLE_DEVICES on every call."""
    calls: list[str] = []
    inference._cuda_torch_installed.cache_clear()
    monkeypatch.setattr(inference.importlib.metadata, "version", lambda name: calls.append(name) or "2.5.0+cpu")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    try:
        assert inference.cuda_present() is False
        assert inference.cuda_present() is False
        assert calls == ["torch"]
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
        assert inference.cuda_present() is False and calls == ["torch"]
    finally:
        inference._cuda_torch_installed.cache_clear()
