"""What MicroVLM's `evaluate` metric scripts share. Each script imports it as `from .local_metric import ...`,
the one kind of local import `evaluate.load(script_path)` follows (it copies the module from the script's own
folder), so every script stays loadable on its own by its path."""

import abc
import re
import sys

import datasets
import evaluate


_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")

COCO_CAPTION_URLS = ("https://github.com/tylin/coco-caption",)

# One caption against one or more references.
CAPTION_FEATURES = datasets.Features(
    {"predictions": datasets.Value("string"), "references": datasets.List(datasets.Value("string"))}
)


def caption_tokens(text: str) -> list[str]:
    """COCO-style caption tokens: lower case, punctuation dropped (COCO's PTB tokeniser needs Java; this regex
    keeps words with inner hyphens or apostrophes whole)."""
    return _WORD.findall(text.lower())


class LocalMetric(evaluate.Metric, metaclass=abc.ABCMeta):
    """An `evaluate.Metric` described by its script's `_DESCRIPTION`, `_KWARGS_DESCRIPTION` and `_CITATION`
    (evaluate's template names; the first two are also its docstring) and its class keywords: `title` (in
    messages), `reference_urls` and `features` (default `CAPTION_FEATURES`), e.g.
    `class RougeL(LocalMetric, title="ROUGE-L", reference_urls=COCO_CAPTION_URLS)`. Subclasses implement `_score`;
    abstract itself, so that `evaluate.load` takes the script's own class, not this one."""

    def __init_subclass__(cls, title: str, reference_urls=(), features=CAPTION_FEATURES, **kwargs):
        super().__init_subclass__(**kwargs)
        script = sys.modules[cls.__module__]
        cls.title = title
        cls.info_fields = {
            "description": script._DESCRIPTION,
            "inputs_description": script._KWARGS_DESCRIPTION,
            "citation": script._CITATION,
            "reference_urls": list(reference_urls),
            "features": features,
        }
        cls.__doc__ = script._DESCRIPTION + script._KWARGS_DESCRIPTION

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(**self.info_fields)

    def _compute(self, predictions: list[str], references: list, **kwargs) -> dict[str, float]:
        if not predictions:
            raise ValueError(f"{self.title} needs at least one prediction")
        return self._score(predictions, references, **kwargs)

    @abc.abstractmethod
    def _score(self, predictions: list[str], references: list, **kwargs) -> dict[str, float]:
        """The metric's figures for `predictions` (at least one) against `references`."""
