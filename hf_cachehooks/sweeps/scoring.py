"""Scores per sample and the two best-of-K estimators, with bootstrap intervals over prompts.

A metric scores one completion against its reference: `exact_match` and `contains_answer` use the same
normalisation as `evaluate_model`'s metrics of those names (the scripts' own `normalize`), or pass any
function `(completion, reference) -> float`. From the (prompts, samples) score matrix:

- best-of-K: the best score among a prompt's first K samples, averaged over prompts (the procedure run
  as it would be at K);
- pass@k: the unbiased estimate of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), with n samples per
  prompt of which c pass (score >= `pass_threshold`), averaged over prompts; it uses all n samples for
  every k, so it has less variance than best-of-K at the same n.

Intervals: a percentile bootstrap over prompts (the same resampled prompt sets for every K, so the
curves' intervals are comparable), seeded, so a rerun reports the same numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

Scorer = Callable[[str, Any], float]
ESTIMATORS = ("best_of_k", "pass_at_k")


def _accepted(reference: Any) -> list[str]:
    return [str(r) for r in reference] if isinstance(reference, (list, tuple)) else [str(reference)]


@functools.cache
def script_normalizer(metric: str) -> Callable[[str], str]:
    """The `normalize` function of `evaluate_model`'s metric script `metric`, run from the script's own source.

    Importing the script would import `evaluate`, which imports torch and transformers (13 s on a loaded
    machine, on every cache hit); only its plain top-level statements are run (no imports of other
    modules than `re` and `string`, no classes), so the text rules are the script's, not a copy.
    """
    import ast

    source = (Path(__file__).parents[1] / "evaluation" / "metric_scripts" / f"{metric}.py").read_text()
    tree = ast.parse(source)
    kept = [
        node
        for node in tree.body
        if not isinstance(node, (ast.ClassDef, ast.Import, ast.ImportFrom))
        or (isinstance(node, ast.Import) and all(a.name in ("re", "string") for a in node.names))
    ]
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module(body=kept, type_ignores=[]), f"<{metric} normalize>", "exec"), namespace)
    return namespace["normalize"]


def exact_match(completion: str, reference: Any) -> float:
    """1.0 when the completion equals an accepted answer after SQuAD-style normalisation (as `evaluate_model`)."""
    normalize = script_normalizer("exact_match")
    text = normalize(completion)
    return float(any(text == normalize(r) for r in _accepted(reference)))


def contains_answer(completion: str, reference: Any) -> float:
    """1.0 when an accepted answer appears in the completion as whole words (as `evaluate_model`)."""
    normalize = script_normalizer("contains_answer")
    text = f" {normalize(completion)} "
    return float(any(normalize(r) and f" {normalize(r)} " in text for r in _accepted(reference)))


SCORERS: dict[str, Scorer] = {"exact_match": exact_match, "contains_answer": contains_answer}


def scorer(metric: str | Scorer) -> tuple[str, Scorer]:
    """(name, function) for a metric name or a user function.

    Raises:
        ConfigError: an unknown metric name (names the known ones).
    """
    if callable(metric):
        return getattr(metric, "__name__", "custom"), metric
    if metric not in SCORERS:
        raise ConfigError(
            f"Unknown metric {metric!r} for a sweep. Use one of: {', '.join(SCORERS)}, "
            "or pass a function (completion, reference) -> float."
        )
    return metric, SCORERS[metric]


def score_samples(completions: Sequence[Sequence[str | None]], references: Sequence[Any], score: Scorer) -> np.ndarray:
    """The (prompts, samples) score matrix; a failed or empty sample (None) is scored as an empty answer."""
    return np.array(
        [[float(score(c or "", ref)) for c in row] for row, ref in zip(completions, references)], dtype=np.float64
    ).reshape(len(completions), -1)


def best_of_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Per prompt, the best score among its first k samples."""
    return scores[:, :k].max(axis=1)


def pass_at_k(n: int, c: np.ndarray, k: int) -> np.ndarray:
    """Unbiased pass@k per prompt from n samples with c correct: 1 - C(n-c, k) / C(n, k), computed stably.

    Example:
        >>> pass_at_k(4, np.array([0, 1, 4]), 2).tolist()
        [0.0, 0.5, 1.0]
    """
    if not 1 <= k <= n:
        raise ConfigError(f"pass@k needs 1 <= k <= n samples (k={k}, n={n}).")
    out = np.ones(len(c), dtype=np.float64)
    for i, correct in enumerate(np.asarray(c, dtype=np.int64)):
        if n - correct >= k:  # otherwise every k-subset holds a correct sample
            out[i] = 1.0 - np.prod(1.0 - k / np.arange(n - correct + 1, n + 1))
    return out


def per_prompt(scores: np.ndarray, k: int, estimator: str, pass_threshold: float = 1.0) -> np.ndarray:
    """The estimator's value for each prompt at k."""
    if estimator == "best_of_k":
        return best_of_k(scores, k)
    if estimator == "pass_at_k":
        return pass_at_k(scores.shape[1], (scores >= pass_threshold).sum(axis=1), k)
    raise ConfigError(f"Unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}.")


def bootstrap_indices(n_prompts: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n_prompts) prompt indices drawn with replacement: shared by every K and estimator."""
    return np.random.default_rng(seed).integers(0, n_prompts, size=(resamples, n_prompts))


def interval(values: np.ndarray, indices: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """(mean, low, high): the mean over prompts and its percentile bootstrap interval."""
    mean = float(values.mean()) if len(values) else float("nan")
    if not len(values) or not len(indices):
        return mean, mean, mean
    means = values[indices].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return mean, float(low), float(high)
