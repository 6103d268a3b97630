"""Any image–text source as a `datasets.Dataset` with lazily decoded `image` and a `text` column.

* a folder of images with `metadata.jsonl` or `metadata.csv` (datasets' "imagefolder" builder), at its top (one
  "train" split) or in one subfolder per split (`train/`, `validation/`, `test/`),
* webdataset tar shards: a `*.tar` file, a glob, or a folder of them (datasets' "webdataset" builder),
* anything else is taken as a Hub dataset id (`load_dataset(id, split=...)`; needs the network).

`SkipBadSamples` wraps a dataset for training: a sample whose image cannot be decoded, is empty, or has no text
is skipped (the next good one is served) and counted, instead of crashing an epoch.
"""

import glob
import io
import logging
import os
from pathlib import Path
from typing import Any

import datasets
from PIL import Image
from torch.utils.data import Dataset


logger = logging.getLogger(__name__)

WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
WEBDATASET_TEXT_KEYS = ("txt", "caption", "json")


def _webdataset_files(source: str) -> list[str]:
    if os.path.isdir(source):
        return sorted(glob.glob(os.path.join(source, "*.tar")))
    return sorted(glob.glob(source)) if any(ch in source for ch in "*?[") else [source]


def load_image_text_dataset(
    source: str, split: str = "train", image_column: str = "image", text_column: str = "text", **load_kwargs: Any
) -> datasets.Dataset:
    """Load `source` (see the module docstring) with columns `image` (datasets.Image, lazy) and `text`."""
    path = Path(source)
    metadata = ("metadata.jsonl", "metadata.csv", "*/metadata.jsonl", "*/metadata.csv")
    if path.is_dir() and any(next(path.glob(pattern), None) for pattern in metadata):
        dataset = datasets.load_dataset("imagefolder", data_dir=str(path), split=split, **load_kwargs)
    elif source.endswith(".tar") or (path.is_dir() and _webdataset_files(source)) or "*" in source:
        files = _webdataset_files(source)
        if not files:
            raise ValueError(f"no webdataset shards (*.tar) found at {source!r}")
        dataset = datasets.load_dataset("webdataset", data_files={split: files}, split=split, **load_kwargs)
        dataset = _normalise_webdataset(dataset, image_column, text_column)
        image_column, text_column = "image", "text"
    elif path.exists():
        raise ValueError(
            f"{source!r} is neither an image folder with metadata.jsonl/metadata.csv nor webdataset shards"
        )
    else:
        dataset = datasets.load_dataset(source, split=split, **load_kwargs)
    for column in (image_column, text_column):
        if column not in dataset.column_names:
            raise ValueError(f"{source!r}: no column {column!r}; available columns: {dataset.column_names}")
    dataset = dataset.rename_columns({k: v for k, v in ((image_column, "image"), (text_column, "text")) if k != v})
    if not isinstance(dataset.features["image"], datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image())
    return dataset


def _normalise_webdataset(dataset: datasets.Dataset, image_column: str, text_column: str) -> datasets.Dataset:
    """Pick the shard's image key (jpg/png/...) and caption key (txt, or json's `caption`) as image/text."""
    columns = dataset.column_names
    image_key = (
        image_column if image_column in columns else next((k for k in WEBDATASET_IMAGE_KEYS if k in columns), None)
    )
    text_key = text_column if text_column in columns else next((k for k in WEBDATASET_TEXT_KEYS if k in columns), None)
    if image_key is None or text_key is None:
        raise ValueError(
            f"webdataset shards need an image ({WEBDATASET_IMAGE_KEYS}) and a caption ({WEBDATASET_TEXT_KEYS}) key; "
            f"found {columns}"
        )
    if text_key == "json":
        dataset = dataset.map(lambda row: {"text": (row["json"] or {}).get("caption", "")}, remove_columns=["json"])
        text_key = "text"
    keep = {image_key, text_key}
    dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
    return dataset.rename_columns({k: v for k, v in ((image_key, "image"), (text_key, "text")) if k != v})


class SkipBadSamples(Dataset):
    """A map-style view of an image–text dataset that skips bad samples and counts them.

    `dataset[i]` returns sample i if its image decodes to a non-empty picture and its text is non-empty;
    otherwise the next good sample (cyclically), with the skip counted in `skipped` (by reason). Counts are kept
    per process: with DataLoader workers each worker counts its own.
    """

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset.cast_column("image", datasets.Image(decode=False))
        self.skipped: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def _check(self, row: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        if not (row.get("text") or "").strip():
            return None, "empty text"
        image = row.get("image")
        if image is None:
            return None, "missing image"
        try:
            source = image["path"] if image.get("bytes") is None else io.BytesIO(image["bytes"])
            with Image.open(source) as opened:
                opened.load()
                picture = opened.convert("RGB")
        except Exception as error:  # any decoding failure of any PIL plugin counts as a bad sample
            return None, f"undecodable image ({type(error).__name__})"
        if picture.width == 0 or picture.height == 0:
            return None, "zero-size image"
        return {**row, "image": picture}, None

    def __getitem__(self, index: int) -> dict[str, Any]:
        for offset in range(len(self.dataset)):
            sample, reason = self._check(self.dataset[(index + offset) % len(self.dataset)])
            if sample is not None:
                return sample
            self.skipped[reason] = self.skipped.get(reason, 0) + 1
            logger.debug("skipped sample %d: %s", (index + offset) % len(self.dataset), reason)
        raise ValueError("every sample of the dataset is bad: nothing to train on")
