"""The built-in, offline image–text set: coloured shapes on varied backgrounds, generated procedurally.

Each image shows `count` identical shapes (one colour, one shape) in one region (`position`) of a background
(flat tint, gradient, or noise texture, always low in saturation so the shape colour stays recognisable).
Everything is deterministic by (seed, split, index). A fixed set of (colour, shape) pairs (`HELD_OUT_PAIRS`)
never appears in train and appears only in validation and test, while every colour and every shape alone
does appear in train.

Three kinds of sample, all with one schema (see `FEATURES`):

* ``caption``: `image`, `text` = "two red circles on the left".
* ``qa``: `image`, `text` = a question on one attribute (`asked`), `answer` = one word ("red", "two", "circle",
  "left").
* ``recall``: `episode_images` (+ `episode_captions`) of `episode_size` images, `text` = a question about image
  `target_index + 1` ("what colour was the shape in image 2?"), `answer`; `image` is None: once the episode is
  out of the input, only an episodic memory can answer.

The attribute columns (`colour`, `shape`, `count`, `position`) describe the image the answer is about.
"""

import io
import logging
import re
from collections.abc import Iterable
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

COLOURS = {
    "red": (220, 30, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 30),
    "purple": (140, 45, 185),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
COUNTS = {1: "one", 2: "two", 3: "three", 4: "four"}
POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom", "centre": "in the centre"}
# Region of the image each position places its shapes in: (x0, y0, x1, y1) as fractions.
REGIONS = {
    "left": (0.02, 0.1, 0.45, 0.9),
    "right": (0.55, 0.1, 0.98, 0.9),
    "top": (0.1, 0.02, 0.9, 0.45),
    "bottom": (0.1, 0.55, 0.9, 0.98),
    "centre": (0.28, 0.28, 0.72, 0.72),
}
HELD_OUT_PAIRS = (
    ("red", "triangle"),
    ("green", "star"),
    ("blue", "diamond"),
    ("yellow", "circle"),
    ("purple", "square"),
    ("orange", "star"),
)
KINDS = ("caption", "qa", "recall")
SPLITS = ("train", "validation", "test")
QUESTIONS = {
    "colour": "what colour are the shapes?",
    "shape": "what shape is shown?",
    "count": "how many shapes are there?",
    "position": "where are the shapes?",
}
RECALL_QUESTIONS = {
    "colour": "what colour was the shape in image {n}?",
    "shape": "what shape was in image {n}?",
    "count": "how many shapes were in image {n}?",
    "position": "where were the shapes in image {n}?",
}
FEATURES = datasets.Features(
    {
        "kind": datasets.Value("string"),
        "image": datasets.Image(),
        "episode_images": datasets.Sequence(datasets.Image()),
        "episode_captions": datasets.Sequence(datasets.Value("string")),
        "text": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "asked": datasets.Value("string"),
        "colour": datasets.Value("string"),
        "shape": datasets.Value("string"),
        "count": datasets.Value("int32"),
        "position": datasets.Value("string"),
        "target_index": datasets.Value("int32"),
        "held_out": datasets.Value("bool"),
    }
)


def plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def caption_for(attributes: dict[str, Any]) -> str:
    """"two red circles on the left" for {colour, shape, count, position}."""
    count = attributes["count"]
    return f"{COUNTS[count]} {attributes['colour']} {plural(attributes['shape'], count)} {POSITIONS[attributes['position']]}"


def answer_for(attributes: dict[str, Any], asked: str) -> str:
    if asked == "count":
        return COUNTS[attributes["count"]]
    return attributes[asked]


def parse_attributes(text: str) -> dict[str, Any]:
    """The attributes named in a caption (None where the text names none); inverse of `caption_for`."""
    words = re.findall(r"[a-z]+", text.lower())
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((s for w in words for s in SHAPES if w in (s, s + "s")), None)
    count = next((n for w in words for n, name in COUNTS.items() if w == name), None)
    position = next((w for w in words if w in POSITIONS), None)
    return {"colour": colour, "shape": shape, "count": count, "position": position}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-saturation background: a flat tint, a gradient between two tints, or a noise texture."""
    def tint() -> np.ndarray:
        level = rng.choice([rng.uniform(175, 245), rng.uniform(25, 80)])
        return np.clip(level + rng.uniform(-15, 15, 3), 0, 255)

    style = rng.integers(3)
    if style == 0:
        image = np.broadcast_to(tint(), (size, size, 3)).astype(np.float64)
    elif style == 1:
        start, end = tint(), tint()
        ramp = np.linspace(0, 1, size)[:, None, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[None, :, None]
        image = np.broadcast_to(start + (end - start) * ramp, (size, size, 3))
    else:
        image = tint() + rng.normal(0, 12, (size, size, 1))
    return np.clip(image, 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "square":
        side = radius * 0.85
        draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius * 0.8), (cx - radius, cy + radius * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - radius), (cx + radius * 0.75, cy), (cx, cy + radius), (cx - radius * 0.75, cy)], fill=fill)
    elif shape == "star":
        angles = np.linspace(-np.pi / 2, 3 * np.pi / 2, 11)[:-1]
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
        draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")


def render_image(colour: str, shape: str, count: int, position: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw `count` `colour` `shape`s in the `position` region of a random background, as an RGB image."""
    if colour not in COLOURS or count not in COUNTS or position not in REGIONS:
        raise ValueError(f"render_image: unknown attributes {(colour, shape, count, position)}")
    image = Image.fromarray(_background(rng, image_size))
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = (v * image_size for v in REGIONS[position])
    # Lay the shapes out on a grid of the region (1×n along its long side, 2×2 for four), jittered a little.
    columns, rows = (2, 2) if count == 4 else ((count, 1) if x1 - x0 >= y1 - y0 else (1, count))
    cell_w, cell_h = (x1 - x0) / columns, (y1 - y0) / rows
    radius = 0.38 * min(cell_w, cell_h)
    for index in range(count):
        column, row = index % columns, index // columns
        cx = x0 + (column + 0.5) * cell_w + rng.uniform(-0.08, 0.08) * cell_w
        cy = y0 + (row + 0.5) * cell_h + rng.uniform(-0.08, 0.08) * cell_h
        _draw_shape(draw, shape, cx, cy, radius, COLOURS[colour])
    return image


def _png(image: Image.Image) -> dict[str, Any]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _attributes(rng: np.random.Generator, split: str) -> dict[str, Any]:
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    if split == "train":
        pairs = [pair for pair in pairs if pair not in HELD_OUT_PAIRS]
    colour, shape = pairs[rng.integers(len(pairs))]
    return {
        "colour": colour,
        "shape": shape,
        "count": int(rng.integers(1, len(COUNTS) + 1)),
        "position": list(POSITIONS)[rng.integers(len(POSITIONS))],
    }


def make_sample(seed: int, split: str, index: int, kinds: tuple[str, ...], image_size: int, episode_size: int) -> dict[str, Any]:
    """Sample `index` of `split`: the same arguments always give the same sample (PNG bytes included)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    kind = kinds[rng.integers(len(kinds))]
    asked = list(QUESTIONS)[rng.integers(len(QUESTIONS))]
    sample = {"kind": kind, "image": None, "episode_images": [], "episode_captions": [], "answer": "", "asked": "",
              "target_index": -1}
    if kind == "recall":
        episode = [_attributes(rng, split) for _ in range(episode_size)]
        target = int(rng.integers(episode_size))
        attributes = episode[target]
        sample["episode_images"] = [_png(render_image(**a, image_size=image_size, rng=rng)) for a in episode]
        sample["episode_captions"] = [caption_for(a) for a in episode]
        sample.update(text=RECALL_QUESTIONS[asked].format(n=target + 1), answer=answer_for(attributes, asked), asked=asked,
                      target_index=target)
    else:
        attributes = _attributes(rng, split)
        sample["image"] = _png(render_image(**attributes, image_size=image_size, rng=rng))
        if kind == "caption":
            sample["text"] = caption_for(attributes)
        else:
            sample.update(text=QUESTIONS[asked], answer=answer_for(attributes, asked), asked=asked)
    sample.update(attributes)
    sample["held_out"] = (attributes["colour"], attributes["shape"]) in HELD_OUT_PAIRS
    return sample


def build_synthetic_dataset(
    num_train: int = 2000,
    num_validation: int = 200,
    num_test: int = 200,
    image_size: int = 64,
    episode_size: int = 4,
    seed: int = 0,
    kinds: Iterable[str] = KINDS,
) -> datasets.DatasetDict:
    """The built-in set as a `DatasetDict` (train / validation / test) whose images decode lazily on access."""
    kinds = tuple(kinds)
    for name, value in (("num_train", num_train), ("num_validation", num_validation), ("num_test", num_test)):
        if value < 0:
            raise ValueError(f"build_synthetic_dataset: {name} must be >= 0, got {value}")
    if image_size < 16:
        raise ValueError(f"build_synthetic_dataset: image_size must be >= 16, got {image_size}")
    if episode_size < 2:
        raise ValueError(f"build_synthetic_dataset: episode_size must be >= 2, got {episode_size}")
    if not kinds or any(kind not in KINDS for kind in kinds):
        raise ValueError(f"build_synthetic_dataset: kinds must be a non-empty subset of {KINDS}, got {kinds}")
    splits = {}
    for split, size in zip(SPLITS, (num_train, num_validation, num_test)):
        rows = [make_sample(seed, split, index, kinds, image_size, episode_size) for index in range(size)]
        columns = {name: [row[name] for row in rows] for name in FEATURES}
        splits[split] = datasets.Dataset.from_dict(columns, features=FEATURES)
    logger.info("built-in shapes set: %s", {split: len(ds) for split, ds in splits.items()})
    return datasets.DatasetDict(splits)
