"""CIDEr-D of captions as computed by the COCO caption toolkit (pycocoevalcap's `Cider`, which is CIDEr-D)."""

import logging
import math
import re
from collections import Counter

import datasets
import evaluate

MAX_N = 4
SIGMA = 6.0
_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")
logger = logging.getLogger(__name__)

_DESCRIPTION = """CIDEr-D (Vedantam et al., 2015) exactly as the COCO caption toolkit computes it. Over the M
examples being scored, the document frequency df(g) of an n-gram g is the number of examples whose reference set
contains g, and idf(g) = log M − log max(1, df(g)). For a sentence s and n = 1..4, g_n(s) is the vector of
tf-idf weights count_s(g) · idf(g) over its n-grams. For a candidate c with references r_1..r_m,

    sim_n(c, r) = Σ_g min(g_n(c)_g, g_n(r)_g) · g_n(r)_g / (‖g_n(c)‖ ‖g_n(r)‖) · exp(−(ℓ_c − ℓ_r)² / (2σ²))
    CIDEr-D(c) = 10 · (1/m) Σ_i (1/4) Σ_n sim_n(c, r_i)

with clipping (the min), the Gaussian length penalty on the word counts ℓ (σ = 6) and the ×10 scale; the score
is the mean over examples. sim_n = 0 when either vector is zero. With a single example every idf is 0 and so is
the score: CIDEr-D needs a corpus. Captions are normalised first: lower case, punctuation dropped."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, one caption per example.
    references: list of list of str, one or more reference captions per example.
Returns:
    cider_d: float, the mean over examples (a candidate equal to its only reference scores 10 when it has at
        least four words and no n-gram occurs in every example's references).
"""

_CITATION = "Vedantam, Zitnick and Parikh, 2015. CIDEr: Consensus-based Image Description Evaluation. CVPR."


def tokenize(text: str) -> list[str]:
    """COCO-style caption tokens: lower case, punctuation dropped."""
    return _WORD.findall(text.lower())


def ngram_counts(tokens: list[str], max_n: int = MAX_N) -> Counter:
    """Counts of every 1..max_n-gram of a token list, keyed by the n-gram tuple."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def cider_d_scores(
    candidates: list[list[str]], references: list[list[list[str]]], max_n: int = MAX_N, sigma: float = SIGMA
) -> list[float]:
    """Per-example CIDEr-D of tokenised candidates against their tokenised references (see the module text)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every prediction needs at least one reference caption")
    if len(candidates) == 1:
        logger.warning("CIDEr-D of a single example is 0: its idf weights need several examples")
    reference_counts = [[ngram_counts(ref, max_n) for ref in refs] for refs in references]
    document_frequency: Counter = Counter()
    for counts in reference_counts:
        document_frequency.update(set().union(*counts))
    log_examples = math.log(len(candidates)) if candidates else 0.0

    def tfidf(counts: Counter) -> tuple[list[dict], list[float]]:
        """Per-n tf-idf vectors {n-gram: weight} and their Euclidean norms."""
        vectors: list[dict] = [{} for _ in range(max_n)]
        for gram, count in counts.items():
            vectors[len(gram) - 1][gram] = count * (log_examples - math.log(max(1.0, document_frequency[gram])))
        return vectors, [math.sqrt(sum(w * w for w in vector.values())) for vector in vectors]

    scores = []
    for candidate, refs, counts in zip(candidates, references, reference_counts):
        cand_vectors, cand_norms = tfidf(ngram_counts(candidate, max_n))
        total = 0.0
        for ref, ref_counts in zip(refs, counts):
            ref_vectors, ref_norms = tfidf(ref_counts)
            # ℓ = word count; the toolkit counts bigrams (ℓ − 1), the same difference whenever sim can be > 0.
            penalty = math.exp(-((len(candidate) - len(ref)) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                if cand_norms[n] == 0 or ref_norms[n] == 0:
                    continue
                # Clipping: a candidate n-gram counts at most as much as it weighs in the reference.
                dot = sum(
                    min(w, ref_vectors[n].get(g, 0.0)) * ref_vectors[n].get(g, 0.0) for g, w in cand_vectors[n].items()
                )
                total += penalty * dot / (cand_norms[n] * ref_norms[n])
        scores.append(10.0 * total / max_n / len(refs))
    return scores


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CiderD(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.List(datasets.Value("string"))}
            ),
            reference_urls=["https://github.com/tylin/coco-caption"],
        )

    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        if not predictions:
            raise ValueError("CIDEr-D needs at least one prediction")
        scores = cider_d_scores(
            [tokenize(p) for p in predictions], [[tokenize(r) for r in refs] for refs in references]
        )
        return {"cider_d": sum(scores) / len(scores)}
