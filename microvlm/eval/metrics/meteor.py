"""METEOR 1.5 of captions through the COCO caption toolkit's Java scorer (pycocoevalcap ships the jar and its
English paraphrase table; a Java runtime must be on PATH)."""

import functools
import shutil

from pycocoevalcap.meteor.meteor import Meteor

from .local_metric import COCO_CAPTION_URLS, LocalMetric, caption_tokens


_DESCRIPTION = """METEOR 1.5 (Denkowski and Lavie, 2014) as the COCO caption toolkit runs it: `java -jar
meteor-1.5.jar - - -stdio -l en -norm`, every example scored against all of its references, and the corpus
score aggregated by METEOR from the pooled matching statistics (not the mean of per-caption scores). Captions are
normalised first as for the other caption metrics: lower case, punctuation dropped. One JVM (≈ 5 s to start,
up to 2 GB heap) is kept per process and reused. Range 0–1."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, one caption per example.
    references: list of list of str, one or more reference captions per example.
Returns:
    meteor: float in [0, 1].
"""

_CITATION = (
    "Denkowski and Lavie, 2014. Meteor Universal: Language Specific Translation Evaluation for Any Target Language. "
    "WMT."
)


def tokenize(text: str) -> str:
    """COCO-style caption normalisation (lower case, punctuation dropped), tokens joined by single spaces."""
    return " ".join(caption_tokens(text))


@functools.cache
def scorer() -> Meteor:
    """The process's METEOR scorer (a JVM subprocess, started on first use)."""
    if shutil.which("java") is None:
        raise RuntimeError("METEOR needs a Java runtime on PATH (e.g. `apt-get install default-jre-headless`)")
    return Meteor()


class CaptionMeteor(
    LocalMetric, title="METEOR", reference_urls=("https://www.cs.cmu.edu/~alavie/METEOR/", *COCO_CAPTION_URLS)
):
    def _score(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        if any(len(refs) == 0 for refs in references):
            raise ValueError("every prediction needs at least one reference caption")
        candidates = {i: [tokenize(p)] for i, p in enumerate(predictions)}
        targets = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
        score, _ = scorer().compute_score(targets, candidates)
        return {"meteor": float(score)}
