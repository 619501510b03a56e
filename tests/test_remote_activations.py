"""Activation stores on S3 (moto on loopback): extracted into the local copy, uploaded whole, and read on another
machine from its verified local copy with the same zero-copy path; a tampered shard is never served."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_cachehooks import ActivationStore, cache_activations
from hf_cachehooks.cli import main
from hf_cachehooks.errors import ConfigError
from tests import s3_server
from tests.conftest import make_llama, make_tokenizer
from tests.s3_server import bucket_fs, other_machine

s3_endpoint, s3_root = s3_server.s3_endpoint, s3_server.s3_root  # the loopback S3 fixtures
WORDS = "what is the capital of france ? paris two plus four yes no blue red green sky".split()
ROWS = [{"text": " ".join(WORDS[i % 7 : i % 7 + 2 + i % 5]), "type": "a" if i % 2 else "b"} for i in range(12)]


@pytest.fixture(scope="module")
def llama():
    return make_llama(layers=3), make_tokenizer()


def test_a_store_on_s3_is_shared_and_read_from_the_local_copy(llama, s3_root, monkeypatch, tmp_path):
    model, tok = llama
    url = f"{s3_root}/activations/run1"
    made = cache_activations(model, tok, ROWS, url, [1, 2], progress=False, shard_size=5)
    names = {p.rsplit("/", 1)[-1] for p in bucket_fs().find(url)}
    assert {"manifest.json", "data-00000.arrow", "data-00002.arrow", "metadata.json", "CACHEDIR.TAG"} <= names
    other_machine(monkeypatch, tmp_path)
    store = ActivationStore(url)
    assert torch.equal(store.layer(2), made.layer(2)) and store.column("type") == [r["type"] for r in ROWS]
    assert store.folder.is_relative_to(tmp_path / "copy-b")  # mapped from local disk
    again = cache_activations(model, tok, ROWS, url, [1, 2], progress=False)  # a hit: nothing extracted
    assert torch.equal(again.layer(1), made.layer(1))
    assert main(["verify", url]) == 0 and main(["info", url]) == 0


def test_a_tampered_remote_shard_is_never_served(llama, s3_root, monkeypatch, tmp_path, caplog, capsys):
    model, tok = llama
    url = f"{s3_root}/activations/run1"
    cache_activations(model, tok, ROWS, url, [1], progress=False, shard_size=5)
    fs = bucket_fs()
    shard = f"{url}/data-00001.arrow"
    raw = bytearray(fs.cat_file(shard))
    raw[-200] ^= 0xFF
    fs.pipe_file(shard, bytes(raw))
    other_machine(monkeypatch, tmp_path)
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigError, match="holds no finished activation cache"):
        ActivationStore(url)
    assert "data-00001.arrow: content does not match the manifest" in caplog.text
    assert main(["verify", url]) == 1 and "CORRUPT" in capsys.readouterr().out


def test_a_model_by_path_finds_its_store_on_s3_without_loading(s3_root, monkeypatch, tmp_path):
    from hf_cachehooks._models import loading
    from hf_cachehooks.activations.paths import cache_activations_from_path

    folder = tmp_path / "model"
    make_llama(layers=3).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    url = f"{s3_root}/activations/by-path"
    made = cache_activations_from_path(str(folder), ROWS, url, [1], progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded on a cache hit")

    monkeypatch.setattr(loading, "load_weights", refuse)
    again = cache_activations_from_path(str(folder), ROWS, url, [1], progress=False)  # found from the files alone
    assert torch.equal(again.layer(1), made.layer(1))
