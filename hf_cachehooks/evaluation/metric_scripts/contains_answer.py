"""Share of predictions that contain an accepted answer (normalised, as whole words)."""

import re
import string

import datasets
import evaluate

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text):
    text = "".join(ch if ch not in set(string.punctuation) else " " for ch in text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


class ContainsAnswer(evaluate.Metric):
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
        hits = [
            any(normalize(r) and f" {normalize(r)} " in f" {normalize(p)} " for r in refs)
            for p, refs in zip(predictions, references)
        ]
        return {"contains_answer": sum(hits) / max(len(hits), 1)}
