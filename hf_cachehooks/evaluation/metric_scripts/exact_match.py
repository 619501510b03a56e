"""Exact match after SQuAD-style normalisation (lowercase, no punctuation, no articles), best over aliases."""

import re
import string

import datasets
import evaluate

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text):
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of str; references: list of lists of accepted answers",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        hits = [any(normalize(p) == normalize(r) for r in refs) for p, refs in zip(predictions, references)]
        return {"exact_match": sum(hits) / max(len(hits), 1)}
