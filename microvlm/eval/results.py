"""The evaluation's result, typed: what `cli.evaluate_model` returns, `eval_results.json` holds, and the report
(`report.py`) and the model card (`hub_upload`) read. Each field is one section of the JSON, in its order."""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class HeadlineFigure:
    """One figure of the model card's model-index, beside its baseline from the same run and its chance level."""

    task: str
    metric: str
    name: str
    value: float
    baseline_name: str
    baseline: float
    chance: float | None


@dataclass
class EvalResults:
    """Every figure of one evaluation. The sections are JSON-ready dicts keyed by condition (e.g.
    `recall["after forgetting the asked image"]`); `real_photos` is None where no photo package is installed."""

    model_dir: str
    dataset: str
    split: str
    arguments: dict[str, Any]
    counts: dict[str, int]
    captions: dict[str, Any]
    perplexity: dict[str, float]
    qa: dict[str, Any]
    retrieval: dict[str, Any]
    recall: dict[str, Any]
    scope: dict[str, float]
    real_photos: dict[str, Any] | None
    analysis: dict[str, Any]
    headline: list[HeadlineFigure] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of `eval_results.json` (`real_photos` left out when None)."""
        return {key: value for key, value in asdict(self).items() if not (key == "real_photos" and value is None)}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: Path) -> "EvalResults":
        """Read an `eval_results.json`; raises ValueError naming a missing section (write it with
        `python -m microvlm.eval`). Keys the class does not know (card extras) are ignored."""
        values = json.loads(Path(path).read_text())
        required = [f.name for f in fields(cls) if f.name != "real_photos"]
        missing = [name for name in required if name not in values]
        if missing:
            raise ValueError(f"{path}: expected the fields {missing} (write it with `python -m microvlm.eval`)")
        values = {name: values.get(name) for name in (f.name for f in fields(cls))}
        values["headline"] = [HeadlineFigure(**entry) for entry in values["headline"]]
        return cls(**values)
