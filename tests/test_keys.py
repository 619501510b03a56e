import subprocess
import sys

import pytest

from hf_cachehooks._core.keys import canonical, diff_inputs, flatten, make_key
from hf_cachehooks.errors import ConfigError


def test_same_meaning_same_key():
    a = make_key("predictions", {"gen": {"temperature": 0.0, "top_p": 1.0}, "names": ("a", "b")})
    b = make_key("predictions", {"names": ["a", "b"], "gen": {"top_p": 1, "temperature": 0}})
    assert a.digest == b.digest


def test_any_change_changes_key():
    base = {"gen": {"max_new_tokens": 32}, "prompt": {"template": "Q: {q}"}}
    digests = {
        make_key("predictions", base).digest,
        make_key("predictions", {**base, "gen": {"max_new_tokens": 33}}).digest,
        make_key("predictions", {**base, "prompt": {"template": "Q:{q}"}}).digest,
        make_key("generations", base).digest,
    }
    assert len(digests) == 4


def test_key_is_stable_across_processes():
    code = (
        "from hf_cachehooks._core.keys import make_key;"
        "print(make_key('predictions', {'b': {1, 2}, 'a': [1.5, None, 'x']}).digest)"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout
        for seed in ("1", "2")
    }
    assert outs == {make_key("predictions", {"a": [1.5, None, "x"], "b": {2, 1}}).digest + "\n"}


def test_unhashable_value_raises_instead_of_random_key():
    with pytest.raises(ConfigError, match="object"):
        canonical({"x": object()})


def test_diff_names_dotted_fields():
    old = {"generation": {"max_new_tokens": 32, "do_sample": False}, "model": {"name": "m"}}
    new = {"generation": {"max_new_tokens": 64, "do_sample": False}, "model": {"name": "m"}, "extra": 1}
    assert diff_inputs(old, new) == ["extra <absent>→1", "generation.max_new_tokens 32→64"]
    assert flatten({"a": {"b": {"c": 1}}}) == {"a.b.c": 1}


# Non-finite floats (NaN, ±inf): JSON spells them like None, keys must not ---------------------------

NONFINITE = [None, float("nan"), float("inf"), float("-inf")]


def test_nan_inf_and_none_are_distinct_keys():
    assert len({make_key("predictions", {"x": value}).digest for value in NONFINITE}) == 4
    assert canonical([float("nan"), float("-inf")]) == [{"$float": "nan"}, {"$float": "-inf"}]
    assert make_key("k", {"x": "float:nan"}).digest != make_key("k", {"x": float("nan")}).digest
    assert make_key("p", {"x": float("nan")}).digest == make_key("p", {"x": float("nan")}).digest  # nan != nan


def test_finite_keys_and_fingerprints_keep_their_meaning():
    """Digests pinned from before non-finite floats were spelled apart: FORMAT_VERSION stays valid."""
    import numpy as np

    from hf_cachehooks._core.fingerprint import fingerprint_data

    assert (
        make_key("predictions", {"a": [1.5, None, "x", 2.0, -0.25], "b": {"c": True}}).digest
        == "89fcc39d3891da59ac5b76b78cf4281d"
    )
    assert fingerprint_data([{"q": "x", "a": None, "f": 1.5, "g": 2.0}]) == "rows:fe965469fac3fbb99175ef051bc560e6"
    assert fingerprint_data(np.array([0.1, 2.0], dtype=np.float32)) == "rows:373ae86374fbf0308fb0e9cffe9e7ac9"


def test_fingerprint_data_tells_nan_inf_and_none_apart():
    import numpy as np

    from hf_cachehooks._core.fingerprint import fingerprint_data

    rows = [[{"q": "x", "score": value}] for value in NONFINITE]
    assert len({fingerprint_data(r) for r in rows}) == 4
    assert fingerprint_data([{"q": "x", "score": "float:nan"}]) != fingerprint_data(rows[1])  # not a string's spelling
    assert len({fingerprint_data(np.array([v, 1.0])) for v in (np.nan, np.inf, -np.inf)}) == 3
    assert fingerprint_data([{1: float("nan")}]) != fingerprint_data([{1: None}])  # the canonical() fallback path
    for _ in range(2):  # repeated calls (served from the memo of null-free payloads) keep them apart too
        assert [fingerprint_data(r) for r in rows] == [fingerprint_data(r) for r in reversed(rows)][::-1]
        assert len({fingerprint_data(r) for r in rows}) == 4


def test_extend_key_is_make_key_of_the_merged_inputs():
    from hf_cachehooks._core.keys import extend_key, make_key

    base = make_key("predictor", {"model": {"name": "m", "t": 0.0, "nan": float("nan")}, "prompt": ("a", 1.5)})
    for extra in ({"data": {"n": 3.0, "fingerprint": "rows:x"}}, {"data": {"n": 4}}, {"prompt": None}):
        merged = {"model": {"name": "m", "t": 0.0, "nan": float("nan")}, "prompt": ("a", 1.5), **extra}
        assert extend_key(base, "predictions", extra) == make_key("predictions", merged)
    assert extend_key(base, "predictions", {"data": {"n": 3}}) != extend_key(base, "predictions", {"data": {"n": 4}})
