"""The shipped metrics: the fast normalisation gives the old answers, and skipping evaluate's Arrow
round trip gives exactly what `Metric.compute` gives."""

import importlib.util
import random
import re
import string

import pytest

from hf_cachehooks.evaluation.metrics import _SCRIPTS, compute_metrics

_ARTICLES = re.compile(r"\b(a|an|the)\b")
ALPHABET = list("abcxyz AEThe\t\n") + list(string.punctuation) + ["Σ", "ς", "İ", "ß", "é", "\u0301", "€", "\0", "\x1c"]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_metric_{name}", _SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _old_exact(text):  # the set-per-character versions these scripts shipped with
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _old_contains(text):
    text = "".join(ch if ch not in set(string.punctuation) else " " for ch in text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def _texts(rng, n, with_nul):
    words = ["the", "a", "an", "The", "Paris", "ΣΑΣ", "aΣ", "an.", "the,", "x-y", ""]
    pool = ALPHABET if with_nul else [c for c in ALPHABET if c != "\0"]
    return [
        "".join(rng.choice(pool) if rng.random() < 0.6 else " " + rng.choice(words) for _ in range(rng.randrange(12)))
        for _ in range(n)
    ]


@pytest.mark.parametrize("name, old", [("exact_match", _old_exact), ("contains_answer", _old_contains)])
@pytest.mark.parametrize("with_nul", [False, True])
def test_normalisation_is_unchanged_one_by_one_and_all_at_once(name, old, with_nul):
    script = _script(name)
    rng = random.Random(7)
    texts = _texts(rng, 400, with_nul)
    assert [script.normalize(t) for t in texts] == [old(t) for t in texts]
    assert script.normalize_all(texts) == [old(t) for t in texts]
    assert script.normalize_all([]) == []


def test_compute_metrics_equals_evaluate_compute():
    import evaluate

    rng = random.Random(3)
    predictions = _texts(rng, 300, False) + ["Paris", "the answer is 4.", "no"]
    references = [[t] for t in _texts(rng, 300, False)] + [["paris"], ["four", "4"], "No"]
    ours = compute_metrics(("exact_match", "contains_answer"), predictions, references)
    refs = [r if isinstance(r, list) else [str(r)] for r in references]
    theirs = {}
    for name in ("exact_match", "contains_answer"):
        theirs.update(evaluate.load(str(_SCRIPTS / f"{name}.py")).compute(predictions=predictions, references=refs))
    assert ours == theirs and ours["exact_match"] > 0
    # an int answer counts as its text (evaluate's own Arrow encoding JSON-quotes every string of a batch
    # that mixes ints in, so `Metric.compute` is no reference there)
    assert compute_metrics(("exact_match",), ["4", "x"], [["four", 4], "x"]) == {"exact_match": 1.0}
    labels = [0, 1, 2, 1, 0, True]
    ours = compute_metrics(("accuracy", "macro_f1"), [0, 1, 1, 1, 2, 1], labels)
    theirs = {}
    for name in ("accuracy", "macro_f1"):
        theirs.update(
            evaluate.load(str(_SCRIPTS / f"{name}.py")).compute(predictions=[0, 1, 1, 1, 2, 1], references=labels)
        )
    assert ours == theirs
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(("accuracy",), [0, 1], [0])
