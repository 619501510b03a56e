"""The one loader (hf_cachehooks/_models/loading.py): heads, dtype, the attention ladder and its reasons."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_cachehooks._models import loading
from hf_cachehooks._models.architecture import configured_layers, num_layers
from hf_cachehooks._models.loading import ATTENTION_LADDER, attention_ladder, load_model, load_weights
from hf_cachehooks._models.runners import generate_texts
from hf_cachehooks.errors import ConfigError
from tests.conftest import make_llama, make_tokenizer


@pytest.fixture
def tiny_dir(tmp_path):
    make_llama(layers=3).save_pretrained(tmp_path / "tiny")
    make_tokenizer().save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


@pytest.fixture
def attempts(monkeypatch):
    """Record each from_pretrained call's attn_implementation; the rungs in `fail` raise ImportError."""
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained
    seen: list = []
    fail: set = set()

    def recording(*args, **kwargs):
        rung = kwargs.get("attn_implementation")
        seen.append(rung)
        if rung in fail:
            raise ImportError(f"{rung} kernels are not installed\nsecond line of the message")
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    return seen, fail


def test_heads_pick_the_auto_class(tiny_dir):
    model, tokenizer = load_model(tiny_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tokenizer.convert_tokens_to_ids("<pad>") == 0  # the tokenizer saved with the model
    assert type(load_weights(tiny_dir, head="classification")).__name__ == "LlamaForSequenceClassification"
    assert type(load_weights(tiny_dir, head="base")).__name__ == "LlamaModel"
    with pytest.raises(ConfigError, match="head='decoder' is not one of causal, classification, base"):
        load_weights(tiny_dir, head="decoder")


def test_dtype_by_name_or_object_and_a_bad_name_before_any_load(tiny_dir, attempts):
    assert load_weights(tiny_dir, dtype="bfloat16").dtype == torch.bfloat16
    assert load_weights(tiny_dir, dtype=torch.float16).dtype == torch.float16
    assert load_weights(tiny_dir).dtype == torch.float32  # the default
    seen, _ = attempts
    before = len(seen)
    with pytest.raises(ConfigError, match="'flaot16' is not a torch dtype"):
        load_model(tiny_dir, dtype="flaot16")
    assert len(seen) == before


def test_ladder_steps_down_in_order_and_logs_each_reason(tiny_dir, attempts, caplog):
    seen, fail = attempts
    fail.update({"flash_attention_2", "sdpa"})
    reasons: list = []
    caplog.set_level(logging.INFO, logger="hf_cachehooks")
    model, _ = load_model(
        tiny_dir, attn_implementation=ATTENTION_LADDER, on_fallback=lambda rung, why: reasons.append((rung, why))
    )
    assert seen == ["flash_attention_2", "sdpa", "eager"]
    assert model.config._attn_implementation == "eager"
    assert reasons == [
        ("flash_attention_2", "flash_attention_2 kernels are not installed"),
        ("sdpa", "sdpa kernels are not installed"),
    ]  # first line of each message
    assert (
        "attn_implementation=flash_attention_2 failed (flash_attention_2 kernels are not installed); "
        "trying sdpa." in caplog.text
    )
    assert "Using attn_implementation=eager instead of flash_attention_2." in caplog.text


def test_real_flash_attention_failure_falls_back_to_sdpa(tiny_dir, caplog):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here: nothing to fall back from")
    caplog.set_level(logging.WARNING, logger="hf_cachehooks")
    model = load_weights(tiny_dir, attn_implementation=attention_ladder("flash_attention_2"))
    assert model.config._attn_implementation == "sdpa"
    assert "attn_implementation=flash_attention_2 failed" in caplog.text


def test_first_success_stops_the_ladder(tiny_dir, attempts):
    seen, _ = attempts
    load_weights(tiny_dir, attn_implementation=("sdpa", "eager"))
    assert seen == ["sdpa"]


def test_the_last_rung_error_is_raised_unchanged(tiny_dir, attempts):
    seen, fail = attempts
    fail.update(ATTENTION_LADDER)
    with pytest.raises(ImportError, match="eager kernels are not installed"):
        load_weights(tiny_dir, attn_implementation=ATTENTION_LADDER)
    assert seen == list(ATTENTION_LADDER)
    with pytest.raises(ImportError, match="flash_attention_2 kernels"):  # a single rung: no fallback
        load_weights(tiny_dir, attn_implementation="flash_attention_2")


def test_a_missing_model_is_not_retried_down_the_ladder(tmp_path, attempts):
    seen, _ = attempts
    with pytest.raises(OSError):
        load_weights(str(tmp_path / "no-such-model"), attn_implementation=ATTENTION_LADDER)
    assert seen == ["flash_attention_2"]


def test_default_attention_is_left_to_transformers(tiny_dir, attempts):
    seen, _ = attempts
    load_weights(tiny_dir)
    assert seen == [None]  # no attn_implementation passed at all
    with pytest.raises(ConfigError, match="empty"):
        load_weights(tiny_dir, attn_implementation=())


def test_attention_ladder_from_a_rung():
    assert attention_ladder("flash_attention_2") == ("flash_attention_2", "sdpa", "eager")
    assert attention_ladder("sdpa") == ("sdpa", "eager")
    assert attention_ladder("flex_attention") == ("flex_attention",)


def test_config_layers_match_the_loaded_model_before_any_weights(tiny_dir):
    config = loading.load_config(tiny_dir)
    assert configured_layers(config) == 3 == num_layers(load_weights(tiny_dir))
    from transformers import GPT2Config

    assert configured_layers(GPT2Config(n_layer=5)) == 5


def test_loading_and_generating_leave_the_tokenizer_as_saved(tmp_path):
    """A tokenizer without a pad token stays without one: batches pad with eos instead of setting it."""
    tok = make_tokenizer()
    tok.pad_token = None
    make_llama().save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, tokenizer = load_model(str(tmp_path / "m"))
    assert tokenizer.pad_token is None
    out = generate_texts(
        model, tokenizer, ["q what is two plus two ?", "q is the sky blue ?"], {"max_new_tokens": 2, "do_sample": False}
    )
    assert len(out) == 2 and tokenizer.pad_token is None and tokenizer.padding_side == "right"
