"""Caption/QA metrics and embedding/attention/memory/retrieval analysis against independent references: sacrebleu
itself, hand-worked LCS and CIDEr-D cases, pycocoevalcap (when installed), closed-form Epps–Pulley integrals."""

import inspect
import math
import socket

import evaluate
import pytest
import sacrebleu
import torch

from microvlm.analysis import (
    attention_stats,
    epps_pulley,
    epps_pulley_null,
    epps_pulley_slices,
    gaussianity_report,
    linear_probe,
    recall_from_similarity,
    retrieval_recall,
    sliced_epps_pulley,
    slot_utilisation,
    unit_directions,
)
from microvlm.metrics import available_metrics, caption_metrics, load_metric, meteor_available, metric_path
from microvlm.metrics.cider_d.cider_d import cider_d_scores
from microvlm.metrics.exact_match.exact_match import normalise
from microvlm.metrics.rouge_l.rouge_l import lcs_length

PREDICTIONS = ["two red circles on the left", "one blue star at the top", "three green squares"]
REFERENCES = [
    ["two red circles on the left", "a pair of red circles at the left"],
    ["one blue square at the top"],
    ["three green squares in the centre", "three small green squares"],
]


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_load_from_their_local_scripts_without_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a metric tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    assert {"caption_bleu", "rouge_l", "cider_d", "exact_match", "meteor"} <= set(available_metrics())
    for name in available_metrics():
        if name == "meteor" and not meteor_available():
            continue
        module = load_metric(name)
        assert isinstance(module, evaluate.EvaluationModule)
        # The code that runs is evaluate's cached copy of our script, byte for byte.
        assert inspect.getsource(inspect.getmodule(type(module))) == metric_path(name).read_text()
    with pytest.raises(ValueError, match="unknown metric"):
        load_metric("bleu")


def test_caption_bleu_equals_sacrebleu_with_one_or_many_references():
    bleu = load_metric("caption_bleu")
    streams = [[refs[0] for refs in REFERENCES], [refs[1] if len(refs) > 1 else None for refs in REFERENCES]]
    assert bleu.compute(predictions=PREDICTIONS, references=REFERENCES)["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(PREDICTIONS, streams).score
    )
    single = [[refs[0]] for refs in REFERENCES]
    assert bleu.compute(predictions=PREDICTIONS, references=single)["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(PREDICTIONS, [streams[0]]).score
    )
    shouted = [p.upper() for p in PREDICTIONS]
    assert caption_metrics(shouted, REFERENCES, meteor=False)["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(shouted, streams, lowercase=True).score
    )


def test_rouge_l_hand_worked_lcs_example():
    candidate = "a red circle on the left"
    long_ref, short_ref = "the red circle is on the left side", "a red circle"
    assert lcs_length(candidate.split(), long_ref.split()) == 5  # red circle on the left
    rouge = load_metric("rouge_l")
    # One reference: P = 5/6, R = 5/8, F = (1 + β²) P R / (R + β² P) with β = 1.2.
    p, r = 5 / 6, 5 / 8
    assert rouge.compute(predictions=[candidate], references=[[long_ref]])["rouge_l"] == pytest.approx(
        2.44 * p * r / (r + 1.44 * p)
    )
    # Two references: P and R maximised separately, P = 5/6 (long), R = 3/3 (short).
    assert rouge.compute(predictions=[candidate], references=[[long_ref, short_ref]])["rouge_l"] == pytest.approx(
        2.44 * p * 1.0 / (1.0 + 1.44 * p)
    )
    # Case and punctuation are normalised away; no common token scores 0.
    assert rouge.compute(predictions=["A Red circle, on the LEFT."], references=[[long_ref]])[
        "rouge_l"
    ] == pytest.approx(2.44 * p * r / (r + 1.44 * p))
    assert rouge.compute(predictions=["zebra"], references=[[long_ref]])["rouge_l"] == 0.0


def test_cider_d_identical_captions_and_a_hand_computed_corpus():
    cider = load_metric("cider_d")
    references = [["a red circle"], ["a blue square"], ["a green star"]]
    # Identical to its only reference: cosine 1 for n = 1..3, no 4-gram in three words, no length penalty.
    assert cider.compute(predictions=[r[0] for r in references], references=references)["cider_d"] == pytest.approx(
        7.5
    )
    four_words = [["a big red circle"], ["one small blue square"]]
    assert cider.compute(predictions=[r[0] for r in four_words], references=four_words)["cider_d"] == pytest.approx(
        10.0
    )
    assert cider.compute(predictions=["zebra"] * 3, references=references)["cider_d"] == 0.0
    # Two examples; every reference n-gram occurs in one example, so every idf is log 2 and cancels in cosines.
    # A: "red red" vs "red square": clipped unigram dot min(2L, L)·L over norms 2L·√2L → 1/(2√2); bigrams 0.
    # B: "blue" vs "blue star": unigram cosine 1/√2, length penalty exp(−1/72); vs "blue": 1. Mean over refs.
    score_a = 10 / 4 * (1 / (2 * math.sqrt(2)))
    score_b = 10 / 4 * ((1 / math.sqrt(2)) * math.exp(-1 / 72) + 1) / 2
    result = cider.compute(predictions=["red red", "blue"], references=[["red square"], ["blue star", "blue"]])
    assert result["cider_d"] == pytest.approx((score_a + score_b) / 2)


def test_cider_d_and_rouge_l_equal_pycocoevalcap():
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider")
    rouge_module = pytest.importorskip("pycocoevalcap.rouge.rouge")
    predictions = PREDICTIONS + ["a red circle", "two green stars at the top right", "one small square", "circles"]
    references = REFERENCES + [
        ["a red circle in the middle", "one red circle"],
        ["two green stars top right"],
        ["a small blue square", "one small square at the bottom", "a square"],
        ["three circles"],
    ]
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [p] for i, p in enumerate(predictions)}
    expected_cider, per_caption = cider_module.Cider().compute_score(gts, res)
    ours = cider_d_scores([p.split() for p in predictions], [[r.split() for r in refs] for refs in references])
    assert ours == pytest.approx(per_caption.tolist(), abs=1e-9)
    cider = load_metric("cider_d").compute(predictions=predictions, references=references)["cider_d"]
    assert cider == pytest.approx(expected_cider)
    expected_rouge, _ = rouge_module.Rouge().compute_score(gts, res)
    rouge = load_metric("rouge_l").compute(predictions=predictions, references=references)["rouge_l"]
    assert rouge == pytest.approx(expected_rouge)


def test_exact_match_normalisation_and_multiple_answers():
    assert normalise("  The Red.  ") == "red"
    assert normalise("An apple, a day!") == "apple day"
    assert normalise("theatre") == "theatre"  # articles only as whole words
    exact = load_metric("exact_match")
    single = exact.compute(predictions=["The Red.", "two", "a circle"], references=["red", "three", "circle"])
    assert single["exact_match"] == pytest.approx(2 / 3)
    several = exact.compute(predictions=["Two!", "left"], references=[["2", "two"], ["right"]])
    assert several["exact_match"] == pytest.approx(1 / 2)


def test_caption_metrics_keys_and_meteor_when_java_is_present():
    without = caption_metrics(PREDICTIONS, REFERENCES, meteor=False)
    assert set(without) == {"bleu", "rouge_l", "cider_d"}
    with pytest.raises(ValueError, match="predictions but"):
        caption_metrics(PREDICTIONS, REFERENCES[:2], meteor=False)
    if not meteor_available():
        pytest.skip("METEOR needs Java and pycocoevalcap")
    results = caption_metrics(PREDICTIONS, REFERENCES)
    assert set(results) == {"bleu", "rouge_l", "cider_d", "meteor"}
    meteor = load_metric("meteor")
    identical = meteor.compute(predictions=["a red circle on the left"], references=[["A red circle on the left."]])
    assert identical["meteor"] == pytest.approx(1.0)
    assert meteor.compute(predictions=["zebra"], references=[["a red circle on the left"]])["meteor"] == 0.0
    assert 0.0 < results["meteor"] < 1.0


# ---------------------------------------------------------------------------------------------- Epps–Pulley


def truncated_gaussian_integral(a: float, t_max: float = 3.0) -> float:
    """∫_{−t_max}^{t_max} e^{−a t²} dt = √(π/a) · erf(t_max √a)."""
    return math.sqrt(math.pi / a) * math.erf(t_max * math.sqrt(a))


def test_epps_pulley_quadrature_matches_the_closed_form_for_a_point_mass():
    # All x_j = 0: φ_N = 1, |φ_N − φ|² w = (1 − e^{−t²/2})² e^{−t²/2} = e^{−t²/2} − 2e^{−t²} + e^{−3t²/2}.
    n = 50
    exact = n * (
        truncated_gaussian_integral(0.5) - 2 * truncated_gaussian_integral(1.0) + truncated_gaussian_integral(1.5)
    )
    points = torch.zeros(n, 3, dtype=torch.float64)
    assert epps_pulley(points, num_points=4001).tolist() == pytest.approx([exact] * 3, rel=1e-7)
    assert epps_pulley(points).tolist() == pytest.approx([exact] * 3, rel=1e-3)  # LeJEPA's 17 points on [0, 3]


def test_epps_pulley_null_mean_matches_its_expectation():
    # For N(0, 1) samples E|φ_N − φ|² = (1 − e^{−t²})/N at every t, so E[T] = ∫ (e^{−t²/2} − e^{−3t²/2}) dt.
    expected = truncated_gaussian_integral(0.5) - truncated_gaussian_integral(1.5)
    samples = torch.randn(100, 4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values = epps_pulley(samples)
    assert float(values.mean()) == pytest.approx(expected, abs=4 * float(values.std()) / math.sqrt(values.numel()))


def test_sliced_epps_pulley_separates_gaussian_from_non_gaussian_embeddings():
    generator = torch.Generator().manual_seed(0)
    n, dim, slices = 500, 16, 64
    null = epps_pulley_null(n, dim, num_slices=slices, repeats=20)
    gaussian = sliced_epps_pulley(torch.randn(n, dim, generator=generator), slices)
    assert gaussian < null["mean"] + 4 * null["std"]
    clusters = torch.cat(
        [
            torch.randn(n // 2, dim, generator=generator) * 0.1 + 3,
            torch.randn(n // 2, dim, generator=generator) * 0.1 - 3,
        ]
    )
    collapsed = torch.randn(n, 1, generator=generator) @ torch.randn(1, dim, generator=generator)
    assert sliced_epps_pulley(clusters, slices) > 10 * null["q95"]
    assert sliced_epps_pulley(collapsed, slices) > 10 * null["q95"]
    # Random projections of a uniform cube look Gaussian in high D (CLT), so the uniform case is 2-D.
    uniform_null = epps_pulley_null(1000, 2, num_slices=slices, repeats=20)
    assert sliced_epps_pulley(torch.rand(1000, 2, generator=generator), slices) > 4 * uniform_null["q95"]


def test_standardisation_removes_scale_only():
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    null = epps_pulley_null(400, 8, num_slices=32, repeats=10, standardise=False)
    # The paper's raw test of N(0, I) rejects a scaled Gaussian; the standardised one sees the same shape.
    assert sliced_epps_pulley(5 * x + 2, 32, standardise=False) > 10 * null["q95"]
    assert sliced_epps_pulley(5 * x + 2, 32) == pytest.approx(sliced_epps_pulley(x, 32))


def test_fixed_directions_give_identical_statistics():
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(2))
    first = epps_pulley_slices(x, 32, seed=5)
    assert torch.equal(first, epps_pulley_slices(x.clone(), 32, seed=5))
    assert torch.equal(first, epps_pulley_slices(x, directions=unit_directions(16, 32, seed=5)))
    assert torch.allclose(
        first, epps_pulley_slices(x[torch.randperm(100)], 32, seed=5)
    )  # order of samples is irrelevant
    assert not torch.allclose(first, epps_pulley_slices(x, 32, seed=6))
    assert unit_directions(16, 32, 5).norm(dim=0).tolist() == pytest.approx([1.0] * 32)
    assert epps_pulley_null(100, 16, 32, repeats=3, seed=5) == epps_pulley_null(100, 16, 32, repeats=3, seed=5)
    with pytest.raises(ValueError, match="directions"):
        epps_pulley_slices(x, directions=unit_directions(8, 32))


def test_gaussianity_report_puts_the_statistic_beside_its_null():
    collapsed = torch.randn(200, 1) @ torch.randn(1, 8)
    report = gaussianity_report(collapsed, num_slices=32, repeats=9)
    assert report["statistic"] > report["null"]["q95"] and report["p_value"] == pytest.approx(1 / 10)
    assert report["null"] == epps_pulley_null(200, 8, 32, repeats=9)
    assert report["slice_max"] >= report["statistic"] and (report["n"], report["dim"]) == (200, 8)


# ---------------------------------------------------------------------------------------------- attention, slots


def test_attention_entropy_sparsity_and_gini_on_hand_made_rows():
    k = 8
    uniform = attention_stats(torch.full((2, 4, k), 1 / k))
    assert uniform["entropy"] == pytest.approx(math.log(k)) and uniform["normalised_entropy"] == pytest.approx(1.0)
    assert uniform["sparsity"] == 0.0 and uniform["gini"] == pytest.approx(0.0)
    one_hot = attention_stats(torch.eye(k)[:4])
    assert one_hot["entropy"] == pytest.approx(0.0) and one_hot["sparsity"] == pytest.approx((k - 1) / k)
    assert one_hot["gini"] == pytest.approx((k - 1) / k)
    half = attention_stats(torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    # Sorted (0, 0, .5, .5): Σ (2i − 5) p_(i) / 4 = (0.5 + 1.5) / 4.
    assert half["normalised_entropy"] == pytest.approx(0.5) and half["gini"] == pytest.approx(0.5)
    # A slice of the keys (e.g. the image prefix) is renormalised; its share is reported as mass.
    prefix = attention_stats(torch.tensor([[0.1, 0.1, 0.8], [0.2, 0.2, 0.6]])[:, :2])
    assert prefix["entropy"] == pytest.approx(math.log(2)) and prefix["mass"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="sum to 1"):
        attention_stats(torch.tensor([[0.1, 0.1]]), normalise=False)
    with pytest.raises(ValueError, match="at least 2 keys"):
        attention_stats(torch.ones(3, 1))


def test_slot_utilisation_on_hand_made_addressing_weights():
    weights = torch.zeros(2, 3, 10)
    weights[..., :5] = 1.0
    weights[0, :, :5] = -1.0  # Larimar's weights can be negative: usage is magnitude
    usage = slot_utilisation(weights)
    assert usage["active_fraction"] == pytest.approx(0.5) and usage["effective_slots"] == pytest.approx(5.0)
    assert usage["normalised_usage_entropy"] == pytest.approx(math.log(5) / math.log(10)) and usage["slots"] == 10
    uneven = slot_utilisation(torch.tensor([[[2.0, 1.0, 1.0, 0.0]]]))
    # Shares (1/2, 1/4, 1/4, 0): H = 1.5 log 2, effective 2^1.5.
    assert uneven["usage_entropy"] == pytest.approx(1.5 * math.log(2)) and uneven["effective_slots"] == pytest.approx(
        2**1.5
    )
    assert uneven["active_fraction"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="all zero"):
        slot_utilisation(torch.zeros(2, 3, 4))


# ---------------------------------------------------------------------------------------------- retrieval


def test_retrieval_recall_on_identity_shuffled_and_collapsed_embeddings():
    n = 10
    embeds = torch.randn(n, 32, generator=torch.Generator().manual_seed(0))
    perfect = retrieval_recall(embeds, 3 * embeds, ks=(1, 5))
    assert all(value == 1.0 for value in perfect.values()) and set(perfect) == {
        "image_to_text_r@1",
        "image_to_text_r@5",
        "text_to_image_r@1",
        "text_to_image_r@5",
    }
    # Orthogonal embeddings, texts rolled by one: the top candidate is always wrong and the right one ties at 0
    # with the other n − 2 wrong ones, so R@5 = P(right one among 4 of n − 1 tied places) = 4 / (n − 1).
    shuffled = retrieval_recall(torch.eye(n), torch.eye(n).roll(1, dims=0), ks=(1, 5))
    assert shuffled["image_to_text_r@1"] == 0.0 and shuffled["text_to_image_r@1"] == 0.0
    assert shuffled["image_to_text_r@5"] == pytest.approx(4 / (n - 1))
    # Collapsed embeddings: everything ties, so recall is chance k / n rather than 0 or 1.
    collapsed = retrieval_recall(torch.ones(n, 4), torch.ones(n, 4), ks=(1, 5))
    assert collapsed["image_to_text_r@1"] == pytest.approx(1 / n) and collapsed["text_to_image_r@5"] == pytest.approx(
        5 / n
    )
    with pytest.raises(TypeError, match="recall_from_similarity"):
        retrieval_recall(torch.eye(n), torch.eye(n, dtype=torch.bool))


def test_recall_from_similarity_counts_identical_captions_as_right():
    # Texts 0 and 1 are the same caption; image 0 prefers text 1.
    similarity = torch.tensor([[0.5, 0.9, 0.1], [0.2, 0.8, 0.3], [0.1, 0.2, 0.7]])
    assert recall_from_similarity(similarity, ks=(1,))["image_to_text_r@1"] == pytest.approx(2 / 3)
    correct = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    assert recall_from_similarity(similarity, correct, ks=(1,))["image_to_text_r@1"] == 1.0


def test_linear_probe_equals_primal_ridge_computed_independently():
    import numpy as np

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(60, 7, generator=generator) * torch.arange(1, 8) + 3.0
    labels = torch.randint(0, 3, (60,), generator=generator)
    # Reference in numpy, primal form: standardise with the first half, add a bias column, solve (XᵀX + λI) W = XᵀY.
    x, y = features.numpy().astype(np.float64), labels.numpy()
    train, test = x[:30], x[30:]
    mean, std = train.mean(0), train.std(0, ddof=1)
    design = lambda a: np.hstack([(a - mean) / std, np.ones((len(a), 1))])
    a = design(train)
    lam = 0.1 * np.trace(a @ a.T) / 30
    weights = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ np.eye(3)[y[:30]])
    expected = float(((design(test) @ weights).argmax(1) == y[30:]).mean())
    assert linear_probe(features, labels, 3) == pytest.approx(expected)


def test_linear_probe_reads_a_linearly_coded_label_and_not_noise():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (400,), generator=generator)
    coded = torch.nn.functional.one_hot(labels, 4).float() @ torch.randn(4, 32, generator=generator)
    noise = torch.randn(400, 32, generator=generator)
    assert linear_probe(coded + 0.1 * noise, labels, 4) == 1.0
    assert linear_probe(noise, labels, 4) < 0.4  # chance is 0.25
    with pytest.raises(ValueError, match="rows"):
        linear_probe(noise[:5], labels[:4], 4)
