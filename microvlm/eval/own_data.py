"""Evaluation on your own data: `python -m microvlm.eval --model_dir D --dataset SOURCE [--split test]`.

SOURCE is what `microvlm.data.sources.load_image_text_dataset` reads: an image folder with `metadata.jsonl` /
`metadata.csv`, webdataset shards, or a Hub dataset id. Rows with a caption (`--text_column`, a string or a list of
reference captions) are captioned and scored with BLEU-4, ROUGE-L, CIDEr-D (and METEOR where it runs) and ranked
for image→text / text→image retrieval (R@1/R@5/R@10 among the first `--num_retrieval` rows); with
`--question_column` and `--answer_column` the rows are questions, scored by exact match and by the VQA accuracy
rule (an answer is min(#references that equal it / 3, 1), the references being a list of human answers).
"""

import logging
from typing import Any

import datasets

from ..data.sources import load_image_text_dataset
from .metrics import caption_metrics


logger = logging.getLogger("microvlm.eval")


def normalise_answer(text: str) -> str:
    """Lower case, stripped, final full stop dropped: the comparison both answer metrics make."""
    return text.strip().lower().rstrip(".").strip()


def vqa_accuracy(predictions: list[str], references: list[list[str]]) -> float:
    """Mean over questions of min(#references equal to the prediction / 3, 1) (VQA's rule, without its
    leave-one-annotator-out averaging); a single reference answer gives 0 or 1."""
    scores = []
    for prediction, answers in zip(predictions, references):
        matches = sum(normalise_answer(prediction) == normalise_answer(answer) for answer in answers)
        scores.append(min(matches / 3, 1.0) if len(answers) > 1 else float(matches > 0))
    return sum(scores) / max(len(scores), 1)


def exact_match_any(predictions: list[str], references: list[list[str]]) -> float:
    """The fraction of predictions equal (normalised) to one of their references."""
    hits = [
        any(normalise_answer(p) == normalise_answer(a) for a in answers) for p, answers in zip(predictions, references)
    ]
    return sum(hits) / max(len(hits), 1)


def as_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def load_rows(
    source: str,
    split: str,
    image_column: str,
    text_column: str,
    question_column: str | None,
    answer_column: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Rows in the built-in schema (`kind`, `image`, `text`, `answer`) plus `references` (list of strings), at most
    `limit` of them. Rows whose image cannot be decoded are dropped (counted in the log)."""
    if (question_column is None) != (answer_column is None):
        raise ValueError("give both --question_column and --answer_column for questions, or neither for captions")
    questions = question_column is not None
    dataset = load_image_text_dataset(
        source, split=split, image_column=image_column, text_column=question_column if questions else text_column
    )
    if questions and answer_column not in dataset.column_names:
        raise ValueError(f"{source!r}: no column {answer_column!r}; available columns: {dataset.column_names}")
    dataset = dataset.select(range(min(limit, len(dataset)))).cast_column("image", datasets.Image(decode=False))
    rows, dropped = [], 0
    for row in dataset:
        try:
            image = datasets.Image().decode_example(row["image"]).convert("RGB")
        except Exception as error:  # any PIL plugin's failure: the row is dropped, as in training
            dropped += 1
            logger.debug("dropped a row: undecodable image (%s)", type(error).__name__)
            continue
        if questions:
            references = as_list(row[answer_column])
            rows.append({"kind": "qa", "image": image, "text": row["text"], "answer": references[0]})
        else:
            references = as_list(row["text"])
            rows.append({"kind": "caption", "image": image, "text": references[0]})
        rows[-1]["references"] = references
    if dropped:
        logger.warning("%s: %d rows dropped (undecodable images)", source, dropped)
    if not rows:
        raise ValueError(f"{source!r} split {split!r}: no row with a readable image")
    return rows


def score_captions(predictions: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
    return caption_metrics(predictions, [row["references"] for row in rows])


def score_answers(predictions: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
    references = [row["references"] for row in rows]
    return {
        "exact_match": exact_match_any(predictions, references),
        "vqa_accuracy": vqa_accuracy(predictions, references),
    }
