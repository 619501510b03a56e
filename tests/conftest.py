"""Shared fixtures: every cache points at tmp_path; tiny random-init models and an in-process tokenizer."""

from __future__ import annotations

import logging
import os

import pytest

# No network at run time, as in CI (`.ci/run` sets these too): a Hub lookup never waits on a connection.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

WORDS = [
    "what",
    "is",
    "the",
    "capital",
    "of",
    "france",
    "paris",
    "two",
    "plus",
    "four",
    "answer",
    "q",
    "a",
    "color",
    "sky",
    "blue",
    "red",
    "green",
    "yes",
    "no",
    "?",
    ":",
    "<|user|>",
    "<|assistant|>",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test touches outputs/cache or the user's Hub cache."""
    monkeypatch.setenv("HF_CACHEHOOKS_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _deprecations_warn_again():
    """Each test sees the once-per-process deprecation warnings of the cache keywords afresh."""
    from hf_cachehooks._core.cache_config import WARNED

    WARNED.clear()


def make_tokenizer(extra_words=(), chat_template=CHAT_TEMPLATE):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS, *extra_words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = chat_template
    return tok


def rewrite_in_place(path, data: bytes) -> None:
    """Overwrite `path` keeping its size, inode and times (what `cp -p` / `rsync --inplace -t` leave)."""
    import os

    st = os.stat(path)
    assert len(data) == st.st_size
    with open(path, "r+b") as handle:
        handle.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def make_llama(seed=0, vocab_size=64, layers=2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def model_path(tmp_path):
    """A tiny 3-layer Llama and its tokenizer saved to a folder: a model given by path."""
    folder = tmp_path / "model"
    make_llama(layers=3).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) shared by tests that do not change them."""
    return make_llama(), make_tokenizer()


@pytest.fixture
def qa_rows():
    return [
        {"question": "what is the capital of france ?", "answer": "paris"},
        {"question": "what is two plus two ?", "answer": ["four", "4"]},
        {"question": "what color is the sky ?", "answer": "blue"},
        {"question": "is the sky green ?", "answer": "no"},
        {"question": "is paris the capital of france ?", "answer": "yes"},
    ]


@pytest.fixture
def root():
    """The cache root the autouse fixture set up."""
    from hf_cachehooks._core.store import cache_root

    return cache_root()


@pytest.fixture
def cache(root):
    """A prediction cache in that root, on the real clock, with no expiry."""
    from hf_cachehooks import CacheConfig
    from hf_cachehooks.evaluation.predictions import PredictionCache

    return PredictionCache(CacheConfig(root=root, max_age=None))


@pytest.fixture
def caplog_info(caplog):
    caplog.set_level(logging.INFO, logger="hf_cachehooks")
    return caplog


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is available."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
