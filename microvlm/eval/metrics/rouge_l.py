"""ROUGE-L F-score of captions as computed by the COCO caption toolkit (pycocoevalcap), β = 1.2."""

from .local_metric import COCO_CAPTION_URLS, LocalMetric, caption_tokens


BETA = 1.2

_DESCRIPTION = """ROUGE-L (Lin, 2004) as in the COCO caption toolkit: for a candidate c and references r_1..r_m,
with LCS the longest common subsequence of the token lists,

    P = max_i LCS(c, r_i) / |c|,   R = max_i LCS(c, r_i) / |r_i|,   F = (1 + β²) P R / (R + β² P),  β = 1.2

(P and R maximised separately over the references; F = 0 when P or R is 0), averaged over the examples.
Captions are normalised first: lower case, punctuation dropped (COCO's PTB tokeniser needs Java; this regex keeps
words with inner hyphens or apostrophes whole). Range 0–1."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, one caption per example.
    references: list of list of str, one or more reference captions per example.
Returns:
    rouge_l: float in [0, 1], the mean over examples.
"""

_CITATION = "Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries. ACL workshop."


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, O(|a|·|b|))."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_score(candidate: list[str], references: list[list[str]], beta: float = BETA) -> float:
    """ROUGE-L F of one tokenised candidate against its tokenised references."""
    if not references:
        raise ValueError("every prediction needs at least one reference caption")
    common = [lcs_length(candidate, reference) for reference in references]
    precision = max(c / len(candidate) if candidate else 0.0 for c in common)
    recall = max(c / len(reference) if reference else 0.0 for c, reference in zip(common, references))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


class RougeL(LocalMetric, title="ROUGE-L", reference_urls=COCO_CAPTION_URLS):
    def _score(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        scores = [
            rouge_l_score(caption_tokens(p), [caption_tokens(r) for r in refs])
            for p, refs in zip(predictions, references)
        ]
        return {"rouge_l": sum(scores) / len(scores)}
