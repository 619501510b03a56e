import subprocess
import sys

import pytest

from hf_cachehooks.errors import ConfigError
from hf_cachehooks.keys import canonical, diff_inputs, flatten, make_key


def test_same_meaning_same_key():
    a = make_key("predictions", {"gen": {"temperature": 0.0, "top_p": 1.0}, "names": ("a", "b")})
    b = make_key("predictions", {"names": ["a", "b"], "gen": {"top_p": 1, "temperature": 0}})
    assert a.digest == b.digest


def test_any_change_changes_key():
    base = {"gen": {"max_new_tokens": 32}, "prompt": {"template": "Q: {q}"}}
    digests = {make_key("predictions", base).digest,
               make_key("predictions", {**base, "gen": {"max_new_tokens": 33}}).digest,
               make_key("predictions", {**base, "prompt": {"template": "Q:{q}"}}).digest,
               make_key("generations", base).digest}
    assert len(digests) == 4


def test_key_is_stable_across_processes():
    code = ("from hf_cachehooks.keys import make_key;"
            "print(make_key('predictions', {'b': {1, 2}, 'a': [1.5, None, 'x']}).digest)")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")}
    assert outs == {make_key("predictions", {"a": [1.5, None, "x"], "b": {2, 1}}).digest + "\n"}


def test_unhashable_value_raises_instead_of_random_key():
    with pytest.raises(ConfigError, match="object"):
        canonical({"x": object()})


def test_diff_names_dotted_fields():
    old = {"generation": {"max_new_tokens": 32, "do_sample": False}, "model": {"name": "m"}}
    new = {"generation": {"max_new_tokens": 64, "do_sample": False}, "model": {"name": "m"}, "extra": 1}
    assert diff_inputs(old, new) == ["extra <absent>→1", "generation.max_new_tokens 32→64"]
    assert flatten({"a": {"b": {"c": 1}}}) == {"a.b.c": 1}
