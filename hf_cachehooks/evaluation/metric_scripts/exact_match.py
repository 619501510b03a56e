"""Exact match after SQuAD-style normalisation (lowercase, no punctuation, no articles), best over aliases."""

import re
import string

import datasets
import evaluate

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)  # one table, not a set per character
_SEP = "\0"  # joins texts for one pass of lower/translate/sub: not whitespace, punctuation, a word char or cased


def normalize(text):
    text = text.lower().translate(_NO_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_all(texts):
    """[normalize(t) for t in texts], with the string passes done once over all texts joined."""
    if any(_SEP in t for t in texts):
        return [normalize(t) for t in texts]
    joined = _ARTICLES.sub(" ", _SEP.join(texts).lower().translate(_NO_PUNCTUATION))
    return [" ".join(part.split()) for part in joined.split(_SEP)] if texts else []


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
        said = normalize_all(predictions)
        accepted = iter(normalize_all([r for refs in references for r in refs]))
        hits = [any([said[i] == next(accepted) for _ in refs]) for i, refs in enumerate(references)]
        return {"exact_match": sum(hits) / max(len(hits), 1)}
