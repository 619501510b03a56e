"""`hf-cachehooks cache-activations` reads the data file once and hashes the model's files once, hit or miss."""

import json
import os
import sys
from collections import Counter

import pytest

import hf_cachehooks.activations.paths  # noqa: F401  (bound names below are patched where they live)
from hf_cachehooks import CacheConfig
from hf_cachehooks._core import rows as rows_module
from hf_cachehooks._models import identity, loading
from hf_cachehooks.activations import spec as spec_module
from hf_cachehooks.activations.paths import cache_activations_from_path
from hf_cachehooks.cli import main
from hf_cachehooks.cli.words import as_flags
from hf_cachehooks.errors import ConfigError

ROWS = [{"text": f"sentence number {i} about the sky", "label": i % 2} for i in range(20)]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS))
    return str(path)


@pytest.fixture
def calls(monkeypatch):
    """Counts data file reads, `load_records` calls, `files_state` calls and model loads, wrapping the real ones
    in every module of the package that holds them."""
    counts: Counter = Counter()
    real = {
        "load_rows": rows_module.load_rows,
        "load_records": spec_module.load_records,
        "files_state": identity.files_state,
        "load_weights": loading.load_weights,
    }

    def counting(name):
        def wrapper(*args, **kwargs):
            if name != "load_rows" or isinstance(args[0], (str, os.PathLike)):  # a list is no read
                counts[name] += 1
            return real[name](*args, **kwargs)

        return wrapper

    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("hf_cachehooks") and module is not None:
            for name, function in real.items():
                if getattr(module, name, None) is function:
                    monkeypatch.setattr(module, name, counting(name))
    return counts


def _cli(capsys, model_path, data, *extra):
    code = main(
        ["cache-activations", "--model", str(model_path), "--data", data, "--layers", "1,2", "--output", "acts", *extra]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_a_miss_a_hit_and_an_expired_store_each_read_the_data_once_and_hash_the_files_once(
    capsys, model_path, data, calls, monkeypatch
):
    first = _cli(capsys, model_path, data)  # a miss, the model's identity not yet remembered
    assert "Cached layers [1, 2] for 20 examples" in first
    assert calls == {"load_rows": 1, "load_records": 1, "files_state": 1, "load_weights": 1}

    calls.clear()
    assert _cli(capsys, model_path, data) == first  # a hit: found from the files alone, nothing loaded
    assert calls == {"load_rows": 1, "load_records": 1, "files_state": 1}

    calls.clear()
    monkeypatch.setattr(CacheConfig, "expired", lambda self, created_at, now=None: True)
    assert _cli(capsys, model_path, data) == first  # expired, the identity remembered: loaded and extracted again
    assert calls == {"load_rows": 1, "load_records": 1, "files_state": 1, "load_weights": 1}


def test_the_library_call_reads_the_data_once_and_hashes_the_files_once(model_path, data, calls):
    cache_activations_from_path(str(model_path), data, "acts", [1], progress=False)
    cache_activations_from_path(str(model_path), data, "acts", [1], progress=False)
    assert calls == {"load_rows": 2, "load_records": 2, "files_state": 2, "load_weights": 1}


def test_the_library_names_its_arguments_and_the_cli_says_them_as_flags(capsys, model_path, data):
    _cli(capsys, model_path, data)
    with pytest.raises(ConfigError, match=r"made from other inputs .*Give another folder=, or force=True to replace"):
        cache_activations_from_path(str(model_path), data, "acts", [1], progress=False)
    code = main(["cache-activations", "--model", str(model_path), "--data", data, "--layers", "1", "--output", "acts"])
    err = capsys.readouterr().err
    assert code == 2 and "Give another --output, or --force to replace it." in err and "force=True" not in err


def test_as_flags_turns_argument_names_into_flags():
    assert as_flags("Re-run cache_activations with folder='/a b' to extract it again.") == (
        "Re-run cache-activations with --output '/a b' to extract it again."
    )
    assert as_flags("Re-run cache_activations with layers= including 2.") == (
        "Re-run cache-activations with --layers including 2."
    )
    assert as_flags("Set text_field=, or pass force=True (x).") == "Set --text-field, or pass --force (x)."
    assert as_flags("cache_activations_from_path(vectors_folder=1)") == "cache_activations_from_path(vectors_folder=1)"
