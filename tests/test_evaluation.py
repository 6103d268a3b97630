"""Evaluation metrics and analysis against independent references; eval → report → hub folder end to end."""

import json
import math

import pytest
import sacrebleu
import torch

from microvlm import MicroVLMConfig, MicroVLMForCausalLM, MicroVLMProcessor
from microvlm.analysis import (attention_stats, epps_pulley, epps_pulley_null, retrieval_recall, slot_utilisation,
                               sliced_epps_pulley)
from microvlm.metrics import caption_metrics, load_metric
from microvlm.metrics.rouge_l.rouge_l import lcs_length

from .test_remote_code import run_isolated


def test_caption_bleu_equals_sacrebleu_and_rouge_l_a_hand_worked_example():
    predictions = ["two red circles on the left", "one blue star at the top", "three green squares"]
    references = [["two red circles on the left"], ["one blue square at the top"], ["three green squares in the centre"]]
    metrics = caption_metrics(predictions, references)
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [[r[0] for r in references]]).score)
    # LCS("one blue star at the top", "one blue square at the top") = 5 of 6 and 6 → P = R = 5/6, F = 5/6.
    assert lcs_length("one blue star at the top".split(), "one blue square at the top".split()) == 5
    expected = (1 + 5 / 6 + (1 + 1.2**2) * 1.0 * 0.5 / (0.5 + 1.2**2 * 1.0)) / 3  # third: P = 3/3, R = 3/6
    assert metrics["rouge_l"] == pytest.approx(expected)
    assert metrics["cider_d"] > 0


def test_cider_d_rewards_consensus_and_is_zero_without_overlap():
    references = [["a red circle"], ["a blue square"], ["a green star"]]
    perfect = load_metric("cider_d").compute(predictions=["a red circle", "a blue square", "a green star"], references=references)
    wrong = load_metric("cider_d").compute(predictions=["zebra", "zebra", "zebra"], references=references)
    swapped = load_metric("cider_d").compute(predictions=["a blue square", "a green star", "a red circle"], references=references)
    assert wrong["cider_d"] == 0 and perfect["cider_d"] > swapped["cider_d"] >= 0
    # Identical candidate and reference: cosine 1 for n = 1..3 and no 4-grams in three words, no length
    # penalty → 10 · (1 + 1 + 1 + 0) / 4.
    assert perfect["cider_d"] == pytest.approx(7.5)


def test_exact_match_normalises_case_punctuation_and_articles():
    assert load_metric("exact_match").compute(predictions=["The Red.", "two", "a circle"], references=["red", "three", "circle"])["exact_match"] == pytest.approx(2 / 3)


def test_epps_pulley_quadrature_matches_the_closed_form_for_a_point_mass():
    # All samples at 0: φ_N(t) = 1, so T = N · 2 ∫_0^3 (1 − e^{−t²/2})² e^{−t²/2} dt; reference by fine quadrature.
    n = 50
    t = torch.linspace(0, 3, 200001, dtype=torch.float64)
    reference = n * 2 * torch.trapezoid((1 - torch.exp(-t**2 / 2)) ** 2 * torch.exp(-t**2 / 2), t)
    value = epps_pulley(torch.zeros(n, 1, dtype=torch.float64))[0]
    assert float(value) == pytest.approx(float(reference), rel=2e-2)  # 17 points vs 200001


def test_sliced_epps_pulley_separates_gaussian_from_collapsed_embeddings():
    torch.manual_seed(0)
    null = epps_pulley_null(300, 32, num_slices=64, repeats=10)
    gaussian = sliced_epps_pulley(torch.randn(300, 32), num_slices=64)
    collapsed = sliced_epps_pulley(torch.randn(300, 1) @ torch.randn(1, 32), num_slices=64)
    clusters = sliced_epps_pulley(torch.cat([torch.randn(150, 32) * 0.1 + 3, torch.randn(150, 32) * 0.1 - 3]), num_slices=64)
    assert gaussian < 2 * null["q95"]
    assert collapsed > 10 * null["q95"] and clusters > 10 * null["q95"]


def test_fixed_directions_give_identical_statistics():
    x = torch.randn(100, 16)
    assert sliced_epps_pulley(x, 32, seed=5) == sliced_epps_pulley(x.clone(), 32, seed=5)


def test_attention_and_slot_statistics_on_hand_made_inputs():
    uniform = attention_stats(torch.full((4, 8), 1 / 8))
    assert uniform["entropy"] == pytest.approx(math.log(8)) and uniform["normalised_entropy"] == pytest.approx(1.0)
    one_hot = attention_stats(torch.eye(8)[:4])
    assert one_hot["entropy"] == pytest.approx(0.0) and one_hot["sparsity"] == pytest.approx(7 / 8)
    weights = torch.zeros(2, 3, 10)
    weights[..., :5] = 1.0
    usage = slot_utilisation(weights)
    assert usage["active_fraction"] == pytest.approx(0.5) and usage["effective_slots"] == pytest.approx(5.0)


def test_retrieval_recall_on_identity_and_shuffled_similarities():
    correct = torch.eye(10, dtype=torch.bool)
    assert retrieval_recall(torch.eye(10), correct)["image_to_text_r@1"] == 1.0
    shuffled = torch.eye(10).roll(1, dims=1)
    result = retrieval_recall(shuffled, correct, ks=(1, 5))
    assert result["image_to_text_r@1"] == 0.0 and result["text_to_image_r@1"] == 0.0


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny")).save_pretrained(folder)
    MicroVLMProcessor.from_preset("tiny").save_pretrained(folder)
    return folder


def test_eval_report_and_hub_folder_end_to_end(saved_model, tmp_path):
    from microvlm.eval import main as evaluate_main
    from microvlm.hub_upload import main as upload_main

    results = evaluate_main(["--model_dir", str(saved_model), "--output_dir", str(tmp_path / "eval"), "--num_test", "48",
                             "--num_retrieval", "12", "--capacity_samples", "6", "--capacity_episode_sizes", "2,4",
                             "--num_slices", "16", "--max_new_tokens", "6"])
    saved = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert saved["headline"] == results["headline"]
    for key in ("captions", "qa", "retrieval", "recall", "analysis", "perplexity", "real_photos"):
        assert key in saved
    assert saved["real_photos"]["count"] == 23  # every photo of the committed list is found offline
    assert set(saved["captions"]) >= {"model", "blank images", "shuffled images", "chance"}
    assert {"memory", "no memory", "empty memory", "another episode's memory", "after forgetting the asked image",
            "after another episode is written on top", "asked image in context (upper bound)"} <= set(saved["recall"])
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Episodic recall" in report and "null 95%" in report
    for plot in ("image_attention.png", "retrieval_similarity.png", "memory_addressing.png"):
        assert (tmp_path / "eval" / plot).is_file()

    folder = upload_main(["--model_dir", str(saved_model), "--eval_json", str(tmp_path / "eval" / "eval_results.json"),
                          "--repo_id", "someone/microvlm-tiny", "--output", str(tmp_path / "hub"), "--dry-run"])
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: \"apache-2.0\"") and "library_name: \"transformers\"" in card
    assert "pipeline_tag: \"image-text-to-text\"" in card and "model-index" in card
    for entry in saved["headline"]:  # the card's figures are the eval JSON's
        assert f"value: {json.dumps(entry['value'])}" in card
    quick_start = card.split("```python\n", 1)[1].split("```", 1)[0].replace('"someone/microvlm-tiny"', repr(str(folder)))
    (tmp_path / "elsewhere").mkdir()
    run_isolated("import sys\nsys.modules['microvlm'] = None\n" + quick_start, cwd=tmp_path / "elsewhere")
