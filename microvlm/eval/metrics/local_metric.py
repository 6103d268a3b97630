"""What MicroVLM's `evaluate` metric scripts share. Each script imports it as `from .local_metric import ...`,
the one kind of local import `evaluate.load(script_path)` follows (it copies the module from the script's own
folder), so every script stays loadable on its own by its path."""

import abc
import re

import datasets
import evaluate


_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")

# One caption against one or more references.
CAPTION_FEATURES = datasets.Features(
    {"predictions": datasets.Value("string"), "references": datasets.List(datasets.Value("string"))}
)


def caption_tokens(text: str) -> list[str]:
    """COCO-style caption tokens: lower case, punctuation dropped (COCO's PTB tokeniser needs Java; this regex
    keeps words with inner hyphens or apostrophes whole)."""
    return _WORD.findall(text.lower())


class LocalMetric(evaluate.Metric, metaclass=abc.ABCMeta):
    """An `evaluate.Metric` whose `MetricInfo` comes from its class keywords, e.g.
    `class RougeL(LocalMetric, description=..., inputs_description=..., citation=..., reference_urls=[...])`;
    `features` defaults to `CAPTION_FEATURES`. The description and inputs description are also its docstring.
    Abstract (no `_compute`), so that `evaluate.load` takes the script's own class, not this one."""

    def __init_subclass__(
        cls,
        description: str = "",
        inputs_description: str = "",
        citation: str = "",
        reference_urls: tuple[str, ...] = (),
        features=CAPTION_FEATURES,
        **kwargs,
    ):
        super().__init_subclass__(**kwargs)
        cls.info_fields = {
            "description": description,
            "inputs_description": inputs_description,
            "citation": citation,
            "reference_urls": list(reference_urls),
            "features": features,
        }
        cls.__doc__ = description + inputs_description

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(**self.info_fields)

    @abc.abstractmethod
    def _compute(self, predictions: list[str], references: list, **kwargs) -> dict[str, float]:
        """The metric's figures for `predictions` against `references`."""
