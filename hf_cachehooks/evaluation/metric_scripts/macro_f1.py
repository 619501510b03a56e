"""Macro-averaged F1 over the label ids that occur in predictions or references."""

import datasets
import evaluate


class MacroF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions, references: lists of int label ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        scores = []
        for label in sorted(set(predictions) | set(references)):
            tp = sum(p == label and r == label for p, r in zip(predictions, references))
            fp = sum(p == label and r != label for p, r in zip(predictions, references))
            fn = sum(p != label and r == label for p, r in zip(predictions, references))
            scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        return {"macro_f1": sum(scores) / max(len(scores), 1)}
