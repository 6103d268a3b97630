"""`evaluate` metric modules shipped with MicroVLM and loaded from their local folders, never from the Hub.

Each metric is a folder holding a script of the same name (evaluate's convention for local modules):
caption_bleu (BLEU-4, sacrebleu), rouge_l (ROUGE-L F, β = 1.2), cider_d (CIDEr-D), meteor (METEOR 1.5 through
pycocoevalcap's jar; needs Java and the `pycocoevalcap` package) and exact_match (short answers).
"""

import functools
import importlib.util
import logging
import shutil
from pathlib import Path
from typing import Any

import evaluate

METRICS_DIR = Path(__file__).resolve().parent
logger = logging.getLogger(__name__)


def available_metrics() -> list[str]:
    """Names of the metric modules shipped in this folder."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def metric_path(name: str) -> Path:
    """Absolute path of a shipped metric's script; resolved from this file, so it works from an installed package."""
    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"unknown metric {name!r}: MicroVLM ships {available_metrics()}")
    return path


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """Load a shipped metric by its local path (no network). Extra keyword arguments go to `evaluate.load`; by
    default the module keeps its cache in memory, so computing writes no Arrow files or locks to disk."""
    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(metric_path(name)), **kwargs)


@functools.cache
def meteor_available() -> bool:
    """Whether METEOR can run here: a Java runtime on PATH and pycocoevalcap (which ships the METEOR 1.5 jar)."""
    missing = [
        what
        for what, present in (
            ("a Java runtime on PATH", shutil.which("java") is not None),
            ("the pycocoevalcap package", importlib.util.find_spec("pycocoevalcap") is not None),
        )
        if not present
    ]
    if missing:
        logger.info("METEOR skipped: it needs %s", " and ".join(missing))
    return not missing


def caption_metrics(
    predictions: list[str], references: list[list[str]], meteor: bool | None = None
) -> dict[str, float]:
    """All caption metrics of `predictions` (one caption each) against `references` (one or more each):
    bleu (BLEU-4, 0–100, lower-cased), rouge_l (0–1), cider_d (0–10 per caption, mean over captions) and, when
    `meteor` is True — or None (the default) and Java and pycocoevalcap are present — meteor (0–1)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    results: dict[str, float] = {}
    # Case carries no meaning in a caption, and every other caption metric is case-insensitive.
    results.update(load_metric("caption_bleu").compute(predictions=predictions, references=references, lowercase=True))
    for name in ("rouge_l", "cider_d"):
        results.update(load_metric(name).compute(predictions=predictions, references=references))
    if meteor or (meteor is None and meteor_available()):
        results.update(load_metric("meteor").compute(predictions=predictions, references=references))
    return results
