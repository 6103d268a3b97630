"""Your own data (issue 12, point 2): `microvlm.eval --dataset` on an image folder with captions or questions, the
VQA accuracy rule, and `microvlm.train --dataset ... --validation_split` evaluating while it trains."""

import json

import pytest
from PIL import Image

from microvlm.eval.cli import main as evaluate_main
from microvlm.eval.own_data import exact_match_any, vqa_accuracy
from microvlm.train.cli import build_trainer


COLOURS = ["red", "blue", "green", "yellow", "white", "black"]


def image_folder(root, rows_by_split: dict[str, list[dict]]):
    """An imagefolder with one subfolder per split, each with its images and metadata.jsonl."""
    for split, rows in rows_by_split.items():
        (root / split).mkdir(parents=True)
        lines = []
        for index, row in enumerate(rows):
            name = f"{index}.png"
            Image.new("RGB", (40, 30), row.pop("colour")).save(root / split / name)
            lines.append(json.dumps({"file_name": name, **row}))
        (root / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def caption_rows() -> list[dict]:
    return [{"colour": c, "caption": [f"a {c} picture", f"{c} everywhere"]} for c in COLOURS]


def test_vqa_accuracy_follows_the_three_annotator_rule():
    references = [["red"] * 3 + ["blue"] * 7, ["red", "red", "blue"], ["Blue."]]
    assert vqa_accuracy(["red", "red", "blue"], references) == pytest.approx((1.0 + 2 / 3 + 1.0) / 3)
    assert exact_match_any(["red", "green", "blue"], references) == pytest.approx(2 / 3)


def test_eval_scores_your_own_captions_and_questions(saved_model, tmp_path):
    captions = image_folder(tmp_path / "captions", {"train": caption_rows(), "test": caption_rows()})
    common = ["--model_dir", str(saved_model), "--num_retrieval", "6", "--max_new_tokens", "4"]
    results = evaluate_main(
        [*common, "--dataset", str(captions), "--text_column", "caption", "--output_dir", str(tmp_path / "a")]
    )
    assert results["count"] == len(COLOURS) and results["split"] == "test"
    assert {"bleu", "rouge_l", "cider_d"} <= set(results["captions"])
    assert {"image_to_text_r@1", "text_to_image_r@10"} <= set(results["retrieval"])
    assert json.loads((tmp_path / "a" / "eval_results.json").read_text()) == results

    questions = [{"colour": c, "question": "what colour is it?", "answers": [c, c, c, "grey"]} for c in COLOURS]
    vqa = image_folder(tmp_path / "vqa", {"test": questions})
    results = evaluate_main(
        [
            *common,
            *("--dataset", str(vqa), "--question_column", "question", "--answer_column", "answers"),
            *("--output_dir", str(tmp_path / "b")),
        ]
    )
    assert set(results["qa"]) == {"exact_match", "vqa_accuracy"}
    assert all(0.0 <= value <= 1.0 for value in results["qa"].values())
    with pytest.raises(ValueError, match="both --question_column and --answer_column"):
        evaluate_main([*common, "--dataset", str(vqa), "--question_column", "question"])


def test_training_on_your_own_data_evaluates_its_validation_split(tmp_path):
    rows = [{"colour": c, "text": f"a {c} picture"} for c in COLOURS]
    data = image_folder(tmp_path / "data", {"train": [dict(r) for r in rows], "validation": [dict(r) for r in rows]})
    trainer = build_trainer(
        "stage1",
        [
            *("--dataset", str(data), "--validation_split", "validation", "--output_dir", str(tmp_path / "run")),
            *("--max_steps", "1", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "3"),
            *("--eval_steps", "1", "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0"),
        ],
        "test",
    )
    assert trainer.eval_dataset is not None
    assert "eval_loss" in trainer.evaluate()
