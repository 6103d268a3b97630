"""Evaluation end to end: eval → JSON, report and plots → the Hub folder, loaded offline in a fresh process.
(The metrics and the analysis statistics are tested against references in test_metrics_and_analysis.py.)"""

import json

import pytest
import torch
from huggingface_hub import ModelCard

from microvlm import MicroVLMConfig, MicroVLMForCausalLM, MicroVLMProcessor

from .test_remote_code import run_isolated


def test_eval_report_and_hub_folder_end_to_end(saved_model, tmp_path):
    from microvlm.eval.cli import main as evaluate_main
    from microvlm.hub_upload.upload import main as upload_main

    results = evaluate_main(
        [
            "--model_dir",
            str(saved_model),
            "--output_dir",
            str(tmp_path / "eval"),
            "--num_test",
            "48",
            "--num_retrieval",
            "12",
            "--capacity_samples",
            "6",
            "--capacity_episode_sizes",
            "2",
            "4",
            "--num_slices",
            "16",
            "--max_new_tokens",
            "6",
        ]
    )
    saved = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert saved == results.to_json()
    for key in ("captions", "qa", "retrieval", "recall", "analysis", "perplexity", "real_photos"):
        assert key in saved
    assert saved["real_photos"]["count"] == 23  # every photo of the committed list is found offline
    assert set(saved["captions"]) >= {"model", "blank images", "shuffled images", "memory on", "chance"}
    assert {
        "memory",
        "no memory",
        "empty memory",
        "another episode's memory",
        "after forgetting the asked image",
        "after editing: the new image's answer",
        "after editing: the old image's answer",
        "after another episode is written on top",
        "asked image in context (upper bound)",
    } <= set(saved["recall"])
    assert set(saved["recall"]["by_attribute"]) <= {"colour", "shape", "count", "position"}
    assert 0 <= saved["scope"]["accuracy"] <= 1 and "memory on" in saved["qa"]
    for pairs in ("seen_pairs", "held_out_pairs"):  # question accuracy by asked attribute, seen vs held-out pairs
        by_attribute = saved["qa"][f"by_attribute_{pairs}"]
        assert set(by_attribute) <= {"colour", "shape", "count", "position"}
        assert all(0.0 <= value <= 1.0 for value in by_attribute.values())
    probe = saved["analysis"]["vision_probe"]
    for source in ("pooled_vision", "prefix", "chance"):
        assert set(probe[source]) == {"colour", "shape", "count", "position"}
        assert all(0.0 <= value <= 1.0 for value in probe[source].values())
    assert probe["rows_train"] + probe["rows_test"] == saved["counts"]["caption"] + saved["counts"]["qa"]
    report = (tmp_path / "eval" / "report.md").read_text()
    for section in ("## Episodic recall", "null 95%", "Linear probes", "ScopeNet decisions", "held out pairs: "):
        assert section in report, section
    for plot in ("image_attention.png", "retrieval_similarity.png", "memory_addressing.png"):
        assert (tmp_path / "eval" / plot).is_file()

    (saved_model / "gradient_flow.jsonl").write_text("{}\n")  # what training leaves beside the weights
    folder = upload_main(
        [
            "--model_dir",
            str(saved_model),
            "--eval_json",
            str(tmp_path / "eval" / "eval_results.json"),
            "--repo_id",
            "someone/microvlm-tiny",
            "--output",
            str(tmp_path / "hub"),
            "--dry-run",
        ]
    )
    card = ModelCard.load(folder / "README.md")  # parses as the Hub does
    data = card.data
    assert (data.license, data.library_name, data.pipeline_tag) == ("apache-2.0", "transformers", "image-text-to-text")
    assert data.datasets is None  # the built-in set is no Hub dataset id
    figures = {(r.metric_name, r.metric_value) for r in data.eval_results}
    assert figures == {(e["name"], e["value"]) for e in saved["headline"]}  # the card's figures are the eval JSON's
    parameters = MicroVLMForCausalLM.from_pretrained(saved_model).num_parameters()
    assert f"Parameters: {parameters:,}." in card.text and parameters > 0
    for entry in saved["headline"]:  # every baseline shown, a chance level only where there is one
        assert f"| {entry['baseline_name']} {entry['baseline']:.4g} |" in card.text
    assert not (folder / "gradient_flow.jsonl").exists()
    card = card.content
    quick_start = (
        card.split("```python\n", 1)[1].split("```", 1)[0].replace('"someone/microvlm-tiny"', repr(str(folder)))
    )
    (tmp_path / "elsewhere").mkdir()
    run_isolated("import sys\nsys.modules['microvlm'] = None\n" + quick_start, cwd=tmp_path / "elsewhere")


@pytest.mark.parametrize("preset", ["tiny", "tiny-m"])
def test_scope_decision_accuracy_is_reported_for_every_family(preset):
    from microvlm.data.synthetic_shapes import build_synthetic_dataset
    from microvlm.eval.cli import EvalArguments, EvalContext, scope_decisions

    torch.manual_seed(0)
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset(preset)).eval()
    rows = list(build_synthetic_dataset(num_train=0, num_validation=0, num_test=24, seed=1)["test"])
    context = EvalContext(model, MicroVLMProcessor.from_preset(preset), EvalArguments(model_dir="", batch_size=8))
    scope = scope_decisions(context, rows)
    recall = sum(row["kind"] == "recall" for row in rows)
    assert 0 < recall < len(rows)
    right = scope["recall rows on"] * recall + scope["caption/qa rows off"] * (len(rows) - recall)
    assert scope["accuracy"] == pytest.approx(right / len(rows))
