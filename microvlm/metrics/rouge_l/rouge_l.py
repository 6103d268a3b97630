"""ROUGE-L F-score as in the COCO caption toolkit: LCS precision/recall against each reference, best of the
references by recall and precision separately, F with β = 1.2; mean over captions, 0–1."""

import datasets
import evaluate

BETA = 1.2


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming)."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, references: list[str]) -> float:
    tokens = candidate.split()
    precisions, recalls = [], []
    for reference in references:
        ref_tokens = reference.split()
        lcs = lcs_length(tokens, ref_tokens)
        precisions.append(lcs / len(tokens) if tokens else 0.0)
        recalls.append(lcs / len(ref_tokens) if ref_tokens else 0.0)
    precision, recall = max(precisions), max(recalls)
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + BETA**2) * precision * recall / (recall + BETA**2 * precision)


class RougeL(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="ROUGE-L F (β=1.2) as in pycocoevalcap, mean over captions.",
            citation="Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions: list of str; references: list of list of str",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references):
        scores = [rouge_l(p.lower(), [r.lower() for r in refs]) for p, refs in zip(predictions, references)]
        return {"rouge_l": sum(scores) / len(scores) if scores else 0.0}
