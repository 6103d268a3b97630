"""`evaluate` metric modules shipped with MicroVLM, loaded from their local folders (nothing from the Hub)."""

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).parent
CAPTION_METRICS = ("caption_bleu", "rouge_l", "cider_d")


def load_metric(name: str) -> evaluate.EvaluationModule:
    """One of caption_bleu, rouge_l, cider_d, exact_match, by its local path."""
    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"unknown metric {name!r}: expected one of {sorted(p.name for p in METRICS_DIR.iterdir() if p.is_dir() and not p.name.startswith('_'))}")
    return evaluate.load(str(path))


def caption_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU-4 (0–100), ROUGE-L (0–1) and CIDEr-D (0–10) of captions against their references."""
    results: dict[str, float] = {}
    for name in CAPTION_METRICS:
        results.update(load_metric(name).compute(predictions=predictions, references=references))
    return results
