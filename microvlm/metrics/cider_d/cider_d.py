"""CIDEr-D (Vedantam et al., 2015) as in the COCO caption toolkit: tf-idf weighted 1–4-gram cosine similarity,
document frequencies over the references of the evaluated set, counts clipped to the reference's, a Gaussian
length penalty (σ = 6), averaged over n and references and scaled by 10; mean over captions."""

import math
from collections import Counter

import datasets
import evaluate

SIGMA = 6.0
MAX_N = 4


def ngrams(sentence: str, n: int) -> Counter:
    words = sentence.lower().split()
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def cider_d(predictions: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """(mean, per-caption) CIDEr-D of `predictions` against `references`."""
    document_frequency: Counter = Counter()
    for refs in references:
        document_frequency.update({gram for ref in refs for n in range(1, MAX_N + 1) for gram in ngrams(ref, n)})
    log_documents = math.log(float(len(references)))

    def vectors(sentence: str) -> tuple[list[dict], list[float], int]:
        vecs, norms = [], []
        for n in range(1, MAX_N + 1):
            counts = ngrams(sentence, n)
            vec = {g: c * (log_documents - math.log(max(1.0, document_frequency[g]))) for g, c in counts.items()}
            vecs.append(vec)
            norms.append(math.sqrt(sum(v * v for v in vec.values())))
        return vecs, norms, len(sentence.split())

    scores = []
    for prediction, refs in zip(predictions, references):
        cand_vecs, cand_norms, cand_len = vectors(prediction)
        total = [0.0] * MAX_N
        for ref in refs:
            ref_vecs, ref_norms, ref_len = vectors(ref)
            penalty = math.exp(-((cand_len - ref_len) ** 2) / (2 * SIGMA**2))
            for n in range(MAX_N):
                dot = sum(min(value, ref_vecs[n].get(g, 0.0)) * ref_vecs[n].get(g, 0.0) for g, value in cand_vecs[n].items())
                if cand_norms[n] and ref_norms[n]:
                    total[n] += penalty * dot / (cand_norms[n] * ref_norms[n])
        scores.append(10.0 * sum(total) / MAX_N / len(refs))
    return (sum(scores) / len(scores) if scores else 0.0), scores


class CiderD(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="CIDEr-D, COCO caption toolkit definition; document frequencies from the given references.",
            citation="Vedantam, Zitnick and Parikh, 2015. CIDEr: Consensus-based Image Description Evaluation.",
            inputs_description="predictions: list of str; references: list of list of str",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references):
        return {"cider_d": cider_d(predictions, references)[0]}
