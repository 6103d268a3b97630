"""Exact match of short answers after normalisation: lower case, punctuation and articles removed, spaces folded."""

import string

import datasets
import evaluate


def normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their reference after normalisation.",
            citation="",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        hits = [normalise(p) == normalise(r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(hits) / len(hits) if hits else 0.0}
