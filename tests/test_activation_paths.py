"""A model given by path: a finished activation store is opened without loading the model; changed files miss."""

import json

import pytest

from hf_cachehooks._models import loading
from hf_cachehooks.activations.paths import cache_activations_from_path, remembered_store
from hf_cachehooks.cli import main
from tests.conftest import make_llama, rewrite_in_place

ROWS = [
    {"text": "what is two plus two ?", "label": "math"},
    {"text": "the sky is blue", "label": "other"},
    {"text": "what is four plus two ?", "label": "math"},
]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS))
    return str(path)


@pytest.fixture
def loads(monkeypatch):
    """Counts real model loads; `loads.refuse = True` makes any load fail the test."""

    class Loads:
        count = 0
        refuse = False

    real = loading.load_weights

    def counting(*args, **kwargs):
        if Loads.refuse:
            raise AssertionError("the model was loaded on a cache hit")
        Loads.count += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "load_weights", counting)
    return Loads


def _cli(capsys, model_path, data, *extra):
    code = main(
        ["cache-activations", "--model", str(model_path), "--data", data, "--layers", "1,2", "--output", "acts", *extra]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_cli_hit_on_a_complete_store_loads_no_model(capsys, model_path, data, loads):
    first = _cli(capsys, model_path, data)
    assert loads.count == 1 and "Cached layers [1, 2] for 3 examples" in first
    loads.refuse = True
    again = _cli(capsys, model_path, data)
    assert again == first  # the same store, found from the files alone
    assert (model_path.parent / "cache" / "identity").is_dir()  # the memo lives in the cache root


def test_changed_weights_file_is_a_miss(capsys, model_path, data, loads):
    from hf_cachehooks.activations.store import ActivationStore

    _cli(capsys, model_path, data)
    before = ActivationStore("acts").key_inputs["model"]["weights"]
    make_llama(seed=1, layers=3).save_pretrained(model_path)  # other weights, same names
    assert remembered_store(str(model_path), data, "acts", [1, 2]) is None
    code = main(
        ["cache-activations", "--model", str(model_path), "--data", data, "--layers", "1,2", "--output", "acts"]
    )
    assert code == 2 and "model.weights" in capsys.readouterr().err  # loaded, keyed, and told what differs
    _cli(capsys, model_path, data, "--force")
    assert loads.count == 3 and ActivationStore("acts").key_inputs["model"]["weights"] != before


def test_weights_rewritten_in_place_with_times_restored_still_miss(model_path, data, loads):
    first = cache_activations_from_path(str(model_path), data, "acts", [1], progress=False)
    weights = model_path / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-4:] = bytes(b ^ 0xFF for b in raw[-4:])  # flip the last weight's bytes, keep the size
    rewrite_in_place(weights, bytes(raw))
    assert remembered_store(str(model_path), data, "acts", [1]) is None
    again = cache_activations_from_path(str(model_path), data, "acts", [1], progress=False, force=True)
    assert loads.count == 2 and again.key_inputs["model"]["weights"] != first.key_inputs["model"]["weights"]


def test_library_hit_and_misses_for_other_inputs(model_path, data, loads):
    first = cache_activations_from_path(str(model_path), data, "acts", [2, 1], progress=False)
    loads.refuse = True
    hit = cache_activations_from_path(str(model_path), data, "acts", [1, 2], progress=False)
    assert hit.manifest == first.manifest and hit.layer(2).equal(first.layer(2))
    for change in ({"dtype": "float32"}, {"positions": "mean"}, {"model_dtype": "bfloat16"}):
        assert remembered_store(str(model_path), data, "acts", [1, 2], **change) is None, change
    assert remembered_store(str(model_path), data, "acts", [1]) is None  # other layers
    assert remembered_store(str(model_path), ROWS[:2], "acts", [1, 2]) is None  # other data


def test_a_memo_made_by_evaluate_model_is_not_read(model_path, data, loads):
    """The two workflows remember identities under different load options: never each other's."""
    from hf_cachehooks._core.store import cache_root
    from hf_cachehooks._models.identity import files_state
    from hf_cachehooks.activations.paths import load_options

    root = cache_root()
    ours = files_state(str(model_path), load_options("causal", "float32", None, None), root)
    theirs = files_state(
        str(model_path), {"task": "generation", "dtype": "float32", "gguf_file": None, "load_kwargs": {}}, root
    )
    assert ours != theirs


def test_unknown_head_is_refused(model_path, data):
    from hf_cachehooks.errors import ConfigError

    with pytest.raises(ConfigError, match="head='lm'"):
        cache_activations_from_path(str(model_path), data, "acts", [1], head="lm")


def test_settings_are_checked_before_the_model_loads(model_path, data, loads):
    from hf_cachehooks.errors import ConfigError

    loads.refuse = True
    with pytest.raises(ConfigError, match="dtype='int8' is not supported"):
        cache_activations_from_path(str(model_path), data, "acts", [1], dtype="int8")
    with pytest.raises(TypeError, match="unexpected keyword arguments: batchsize"):
        cache_activations_from_path(str(model_path), data, "acts", [1], batchsize=4)
