"""Corpus-level BLEU-4 of captions against any number of references each, computed by sacrebleu."""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """Corpus-level BLEU-4 (Papineni et al., 2002) computed by sacrebleu: modified 1–4-gram precisions
pooled over the whole corpus, geometric mean, brevity penalty against the closest reference length. Defaults are
sacrebleu's (13a tokenisation, case-sensitive, exponential smoothing), so the score equals
`sacrebleu.corpus_bleu(predictions, reference_streams)` on the same inputs. Range 0–100."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, one caption per example.
    references: list of list of str, one or more reference captions per example (the count may vary).
    lowercase: bool, lower-case hypotheses and references before scoring (default False, as sacrebleu).
    tokenize: str, a sacrebleu tokeniser name (default "13a").
Returns:
    bleu: float in [0, 100].
"""

_CITATION = "Post, 2018. A Call for Clarity in Reporting BLEU Scores. WMT."


def reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """Transpose per-example reference lists into sacrebleu's streams (one per reference slot); examples with
    fewer references get None in the slots they lack, which sacrebleu skips."""
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every prediction needs at least one reference caption")
    width = max((len(refs) for refs in references), default=0)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionBleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.List(datasets.Value("string"))}
            ),
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(
        self, predictions: list[str], references: list[list[str]], lowercase: bool = False, tokenize: str = "13a"
    ) -> dict[str, float]:
        if not predictions:
            raise ValueError("BLEU needs at least one prediction")
        bleu = sacrebleu.corpus_bleu(
            predictions, reference_streams(references), lowercase=lowercase, tokenize=tokenize
        )
        return {"bleu": float(bleu.score)}
