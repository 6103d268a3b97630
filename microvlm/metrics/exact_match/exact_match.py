"""Normalised exact match of short answers (SQuAD-style normalisation)."""

import re
import string

import datasets
import evaluate

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)

_DESCRIPTION = """Fraction of predictions that equal a reference after normalisation: lower case, ASCII punctuation
deleted (so "red." → "red", "t-shirt" → "tshirt"), the articles a/an/the removed, whitespace folded (the SQuAD
evaluation's normalisation). A reference may be one string or a list of acceptable answers, any of which counts."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str.
    references: list of str, or list of list of str (several acceptable answers per prediction).
Returns:
    exact_match: float in [0, 1].
"""

_CITATION = "Rajpurkar et al., 2016. SQuAD: 100,000+ Questions for Machine Comprehension of Text. EMNLP."


def normalise(text: str) -> str:
    """Lower case, punctuation deleted, articles removed, whitespace folded."""
    text = text.lower().translate(PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.List(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions: list[str], references: list[str] | list[list[str]]) -> dict[str, float]:
        if not predictions:
            raise ValueError("exact match needs at least one prediction")
        hits = [
            normalise(p) in {normalise(r) for r in ([refs] if isinstance(refs, str) else refs)}
            for p, refs in zip(predictions, references)
        ]
        return {"exact_match": sum(hits) / len(hits)}
