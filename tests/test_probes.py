import math
import pickle

import numpy as np
import pytest
import torch

from hf_cachehooks.activations.probes import (
    LogisticProbe,
    _resampled_aurocs,
    auroc,
    bootstrap_auroc,
    cross_fitted_scores,
    diff_of_means,
    fit_logistic,
    layer_report,
    project,
    unit,
)
from hf_cachehooks.activations.vectors import SteeringVector, load_vectors, save_vectors
from hf_cachehooks.errors import ConfigError, CorruptEntryError, ProbeMismatchError

SHIFT = 0.8  # best possible AUROC Phi(0.8 / sqrt 2) = 0.714: in-sample scores clear 0.7, held-out ones may not
STRONG = 1.0  # Phi(1 / sqrt 2) = 0.76: room for held-out and cross-fitted scores to clear 0.7
MODEL = {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "weights": "a" * 32, "dtype": "float32"}


def planted(n=2000, hidden=64, seed=0, shift=SHIFT):
    """x = noise; a random half of the examples shifted by `shift` along one fixed random unit direction."""
    direction = unit(torch.randn(hidden, generator=torch.Generator().manual_seed(1234)))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g)
    positive = torch.zeros(n, dtype=torch.bool)
    positive[torch.randperm(n, generator=g)[: n // 2]] = True
    x[positive] += shift * direction
    return x, positive, direction


def normal_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def make_vector(layer=3, hidden=8, model=MODEL):
    return SteeringVector(
        vector=torch.randn(hidden),
        layer=layer,
        hidden_size=hidden,
        model=dict(model),
        normalized=False,
        positive_label="true",
        negative_label="false",
        n_examples=100,
    )


# --- AUROC ----------------------------------------------------------------------------------------------------


def test_auroc_matches_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for n, levels in [(500, 7), (64, 3), (1000, 1000)]:
        scores = rng.integers(0, levels, n).astype(float)  # heavy ties across classes
        labels = rng.random(n) < 0.3
        scores[labels] += 0.7
        assert auroc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
        assert auroc(torch.tensor(scores, dtype=torch.float16), torch.tensor(labels.astype(int))) == pytest.approx(
            metrics.roc_auc_score(labels, np.float16(scores)), abs=1e-12
        )


def test_auroc_extremes_and_empty_class():
    labels = torch.tensor([False, False, True, True])
    assert auroc(torch.tensor([0.0, 1.0, 2.0, 3.0]), labels) == 1.0
    assert auroc(torch.tensor([3.0, 2.0, 1.0, 0.0]), labels) == 0.0
    assert auroc(torch.ones(4), labels) == 0.5
    assert math.isnan(auroc(torch.randn(5), torch.ones(5, dtype=torch.bool)))
    assert all(math.isnan(v) for v in bootstrap_auroc(torch.randn(5), torch.zeros(5, dtype=torch.bool)))
    with pytest.raises(ConfigError, match="3 labels for 4"):
        auroc(torch.randn(4), [True, False, True])
    with pytest.raises(ConfigError, match="NaN"):
        auroc(torch.tensor([0.0, math.nan]), [True, False])


def test_resampled_aurocs_match_sklearn_per_row_and_skip_one_class_rows():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 20, (300,), generator=g).double()
    labels = torch.rand(300, generator=g) < 0.4
    index = torch.randint(300, (5, 300), generator=g)
    only_negatives = (~labels).nonzero().squeeze(1)[:10]
    index = torch.cat([index, only_negatives.repeat(30).unsqueeze(0)])
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-6)]:
        rows = _resampled_aurocs(scores, labels, index, dtype=dtype)
        for row, idx in zip(rows[:5], index[:5]):
            assert float(row) == pytest.approx(metrics.roc_auc_score(labels[idx], scores[idx]), abs=tol)
        assert math.isnan(rows[5])


def test_bootstrap_interval_is_reproducible_and_sensible():
    x, positive, direction = planted()
    scores = project(x, direction)
    point, low, high = bootstrap_auroc(scores, positive, n_resamples=500, seed=0)
    assert point == auroc(scores, positive)
    assert low < point < high
    assert 0.02 < high - low < 0.1  # SE of an AUROC ~0.71 with 1000 + 1000 examples is ~0.011
    assert bootstrap_auroc(scores, positive, n_resamples=500, seed=0) == (point, low, high)
    assert bootstrap_auroc(scores, positive, n_resamples=500, seed=1) != (point, low, high)
    _, low_80, high_80 = bootstrap_auroc(scores, positive, n_resamples=500, confidence=0.8, seed=0)
    assert low < low_80 < high_80 < high
    with pytest.raises(ConfigError, match="confidence"):
        bootstrap_auroc(scores, positive, confidence=95)


def test_bootstrap_skips_resamples_without_a_positive():
    # One positive in six: a third of the resamples miss it; every other resample has AUROC 1.
    assert bootstrap_auroc([0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 1], n_resamples=300) == (1.0, 1.0, 1.0)


# --- directions -----------------------------------------------------------------------------------------------


def test_diff_of_means_recovers_planted_direction():
    x, positive, direction = planted()
    mean_diff = diff_of_means(x.half(), positive)
    assert mean_diff.dtype == torch.float32
    assert torch.allclose(mean_diff, x[positive].mean(0) - x[~positive].mean(0), atol=2e-3)  # half rounding
    assert torch.nn.functional.cosine_similarity(mean_diff, direction, dim=0) > 0.9
    score = auroc(project(x, mean_diff), positive)
    assert score > 0.7
    # On the planted direction the classes are N(0, 1) vs N(0.8, 1): AUROC = Phi(0.8 / sqrt 2) = 0.714.
    assert auroc(project(x, direction), positive) == pytest.approx(normal_cdf(SHIFT / math.sqrt(2)), abs=0.03)


def test_shuffled_labels_give_chance_auroc():
    x, positive, _ = planted()
    shuffled = positive[torch.randperm(len(positive), generator=torch.Generator().manual_seed(5))]
    assert abs(auroc(project(x, diff_of_means(x, positive)), shuffled) - 0.5) < 0.05
    # Fit and scored on the same data, even random labels look separable; out of fold they do not.
    assert auroc(project(x, diff_of_means(x, shuffled)), shuffled) > 0.55
    assert abs(auroc(cross_fitted_scores(x, shuffled), shuffled) - 0.5) < 0.05
    x, positive, _ = planted(shift=STRONG)
    assert auroc(cross_fitted_scores(x, positive), positive) > 0.7


def test_direction_errors_name_the_problem():
    x = torch.randn(4, 3)
    with pytest.raises(ConfigError, match="0 positive and 4 negative"):
        diff_of_means(x, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ConfigError, match="norm 0"):
        unit(torch.zeros(3))
    with pytest.raises(ConfigError, match="hidden size 3"):
        project(x, torch.ones(5))
    assert torch.allclose(project(x, torch.tensor([0.0, 2.0, 0.0])), x[:, 1])


def test_logistic_probe_separates_and_is_deterministic():
    x, positive, direction = planted(shift=STRONG)
    probe = fit_logistic(x, positive)
    assert isinstance(probe, LogisticProbe)
    x_test, positive_test, _ = planted(seed=1, shift=STRONG)  # same direction, fresh examples
    assert auroc(probe.scores(x_test), positive_test) > 0.7
    raw_direction = probe.weight / probe.std  # back to raw units
    assert torch.nn.functional.cosine_similarity(raw_direction, direction, dim=0) > 0.85
    again = fit_logistic(x, positive)
    assert torch.equal(again.weight, probe.weight) and again.bias == probe.bias
    assert torch.equal(probe.scores(x_test), again.scores(x_test))
    strong = fit_logistic(x, positive, l2=10.0)
    assert strong.weight.norm() < probe.weight.norm()
    with pytest.raises(ConfigError, match="hidden size 64"):
        probe.scores(torch.randn(3, 5))


# --- steering vectors on disk --------------------------------------------------------------------------------


def test_steering_vector_round_trip_without_pickle(tmp_path, monkeypatch):
    vector = make_vector()
    path = vector.save(tmp_path / "v" / "layer_3.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["layer_3.safetensors"]  # no temp file left behind

    def forbidden(*args, **kwargs):
        raise AssertionError("the loader must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = SteeringVector.load(path)
    assert loaded.vector.dtype == torch.float32
    assert torch.equal(loaded.vector.view(torch.int32), vector.vector.view(torch.int32))  # bit-exact
    for field in ("layer", "hidden_size", "model", "normalized", "positive_label", "negative_label", "n_examples"):
        assert getattr(loaded, field) == getattr(vector, field), field


def test_save_is_atomic(tmp_path, monkeypatch):
    import os

    path = make_vector(layer=3).save(tmp_path / "layer_3.safetensors")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        make_vector(layer=3).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["layer_3.safetensors"]


def test_load_rejects_missing_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ConfigError, match="No steering vector"):
        SteeringVector.load(tmp_path / "nope.safetensors")
    save_file({"vector": torch.ones(3)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CorruptEntryError, match="not a steering vector"):
        SteeringVector.load(tmp_path / "foreign.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(CorruptEntryError, match="Cannot read"):
        SteeringVector.load(tmp_path / "junk.safetensors")


def test_check_compatible_names_each_difference():
    vector = make_vector(layer=3, hidden=8)
    vector.check_compatible(dict(MODEL), hidden_size=8, layer=3)
    vector.check_compatible({"name": MODEL["name"]}, hidden_size=8)  # weights unknown: not compared
    with pytest.raises(ProbeMismatchError, match=r"^cache/probe mismatch: weights fingerprint.*generate-vectors"):
        vector.check_compatible({**MODEL, "weights": "b" * 32}, hidden_size=8, layer=3)
    with pytest.raises(ProbeMismatchError, match="cache/probe mismatch: model name"):
        vector.check_compatible({"name": "gpt2"}, hidden_size=8)
    with pytest.raises(ProbeMismatchError, match=r"cache/probe mismatch: hidden size 8 \(probe\) vs 16"):
        vector.check_compatible(dict(MODEL), hidden_size=16, layer=3)
    with pytest.raises(ProbeMismatchError, match=r"cache/probe mismatch: layer 3 \(probe\) vs 5") as info:
        vector.check_compatible(dict(MODEL), hidden_size=8, layer=5)
    assert isinstance(info.value, ValueError)


def test_save_and_load_vectors(tmp_path, caplog):
    vectors = {layer: make_vector(layer=layer) for layer in (2, 10, 7)}
    save_vectors(vectors, tmp_path / "vectors")
    assert sorted(p.name for p in (tmp_path / "vectors").iterdir()) == [
        "layer_10.safetensors",
        "layer_2.safetensors",
        "layer_7.safetensors",
    ]
    loaded = load_vectors(tmp_path / "vectors")
    assert list(loaded) == [2, 7, 10]
    for layer, vector in vectors.items():
        assert torch.equal(loaded[layer].vector, vector.vector) and loaded[layer].layer == layer
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty"):
        load_vectors(tmp_path / "empty")
    with pytest.raises(ConfigError, match="layer 4 says it is for layer 2"):
        save_vectors({4: vectors[2]}, tmp_path / "bad")
    save_vectors({2: vectors[2]}, tmp_path / "vectors")  # older layers stay, with a warning
    assert "layer_10.safetensors, layer_7.safetensors" in caplog.text


# --- layer report ---------------------------------------------------------------------------------------------


def test_layer_report_finds_the_planted_layer():
    x, positive, _ = planted(shift=STRONG)  # scored out of fold, so held-out strength
    g = torch.Generator().manual_seed(9)
    x_by_layer = {4: torch.randn(2000, 64, generator=g).half(), 1: x.half(), 2: torch.randn(2000, 64, generator=g)}
    rows = layer_report(x_by_layer, positive, n_resamples=200)
    assert [row["layer"] for row in rows] == [1, 2, 4]
    by_layer = {row["layer"]: row for row in rows}
    assert by_layer[1]["auroc"] > 0.7
    for layer in (2, 4):
        assert abs(by_layer[layer]["auroc"] - 0.5) < 0.1
    for row in rows:
        assert row["auroc_low"] <= row["auroc"] <= row["auroc_high"]
        assert row["n"] == 2000 and row["n_positive"] == 1000
    assert layer_report(x_by_layer, positive, n_resamples=200) == rows  # deterministic

    # Given vectors are used as they are: the planted layer's vector scores every layer.
    vector = SteeringVector(
        vector=diff_of_means(x, positive),
        layer=1,
        hidden_size=64,
        model=MODEL,
        normalized=False,
        positive_label="t",
        negative_label="f",
        n_examples=2000,
    )
    given = layer_report({1: x}, ~positive, vectors={1: vector}, n_resamples=50)
    assert given[0]["auroc"] == auroc(project(x, vector.vector), ~positive) < 0.3  # flipped labels
    with pytest.raises(ConfigError, match="No vector for layer 2"):
        layer_report({2: x}, positive, vectors={1: vector})
    with pytest.raises(ProbeMismatchError, match="hidden size"):
        layer_report({1: x[:, :32]}, positive, vectors={1: vector})
