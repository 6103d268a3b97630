"""The built-in, offline image–text set: coloured shapes on varied backgrounds, generated procedurally.

Each image shows `count` (1–4) identical shapes, one colour and one shape, placed in one region (`position`:
left, right, top, bottom or centre) of a background that is a flat tint, a gradient between two tints, or a
mild noise texture. Backgrounds are low in chroma (near-grey, light or dark) and every background pixel is at
least `MIN_CONTRAST` away (RGB distance) from the shape colour, so the colour name always refers to the shapes
and stays recognisable. Shapes are drawn at `SUPERSAMPLE`× and box-filtered down, so their edges are
anti-aliased at any `image_size` (32 px works; 64 px is the default; 224 px for full-size vision towers).

Everything is deterministic by (seed, split, index): the same triple always gives the same PNG bytes and text.

Held-out pairs: the (colour, shape) pairs in `HELD_OUT_PAIRS`
(red triangle, green star, blue diamond, yellow circle, purple square, orange star)
never appear in train; in validation and test a fraction `held_out_fraction` (default 0.5) of the images uses
one of them, the rest a train pair (`TRAIN_PAIRS`). Every colour and every shape on its own does appear in train,
so the held-out pairs measure compositional generalisation.

Three kinds of sample, all with one schema (`FEATURES`), so the splits can mix kinds. Sample i of a split has
kind `kinds[i % len(kinds)]` and the recall rows' target positions cycle through the episode, so every split is
balanced over kinds and over the asked position:

* ``caption``: `image`; `text` = "two red circles on the left"; `answer` = "".
* ``qa``: `image`; `text` = a question on one attribute (`asked`), e.g. "how many shapes are there?";
  `answer` = one word ("red", "two", "circle", "left").
* ``recall``: `episode_images` + `episode_captions` of `episode_size` images; `text` = a question about image
  `target_index + 1` ("what colour was the shape in image 2?"); `answer`; `image` is None, so once the episode
  is out of the input only an episodic memory can answer. The asked attribute of the target image differs from
  that of every other image in the episode, so recalling the wrong image never gives the right answer.

Columns (present for every kind):

==================  ======================  ==============================================================
column              type                    value
==================  ======================  ==============================================================
kind                string                  "caption", "qa" or "recall"
image               Image (PNG, lazy)       the image (caption/qa); None for recall
episode_images      List(Image)             the episode (recall); [] otherwise
episode_captions    List(string)            the caption of each episode image (recall); [] otherwise
text                string                  the caption (caption) or the question (qa/recall)
answer              string                  the one-word answer (qa/recall); "" for caption
asked               string                  attribute the question is about (qa/recall); "" for caption
colour, shape       string                  attributes of the sample's image (recall: the asked image)
count               int32                   1–4
position            string                  left / right / top / bottom / centre
target_index        int32                   recall: 0-based index of the asked image; -1 otherwise
held_out            bool                    (colour, shape) is in `HELD_OUT_PAIRS`
==================  ======================  ==============================================================
"""

import io
import itertools
import logging
import numbers
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

# Vocabulary. COLOURS, COUNTS and POSITIONS map each value to its RGB / number word / caption phrase; like the
# SHAPES tuple, iterating one gives its values in a fixed order.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 30),
    "purple": (140, 45, 185),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
COUNTS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
# Region each position places its shapes in, (x0, y0, x1, y1) as fractions of the image side.
REGIONS: dict[str, tuple[float, float, float, float]] = {
    "left": (0.03, 0.08, 0.43, 0.92),
    "right": (0.57, 0.08, 0.97, 0.92),
    "top": (0.08, 0.03, 0.92, 0.43),
    "bottom": (0.08, 0.57, 0.92, 0.97),
    "centre": (0.28, 0.28, 0.72, 0.72),
}
# Never in train; only in validation/test. Each colour at most once, so every colour and shape stays in train.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "star"),
    ("blue", "diamond"),
    ("yellow", "circle"),
    ("purple", "square"),
    ("orange", "star"),
)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    pair for pair in itertools.product(COLOURS, SHAPES) if pair not in HELD_OUT_PAIRS
)
ATTRIBUTES = ("colour", "shape", "count", "position")
KINDS = ("caption", "qa", "recall")
SPLITS = ("train", "validation", "test")
QUESTIONS: dict[str, str] = {
    "colour": "what colour are the shapes?",
    "shape": "what shape is shown?",
    "count": "how many shapes are there?",
    "position": "where are the shapes?",
}
RECALL_QUESTIONS: dict[str, str] = {
    "colour": "what colour was the shape in image {n}?",
    "shape": "what shape was in image {n}?",
    "count": "how many shapes were in image {n}?",
    "position": "where were the shapes in image {n}?",
}
FEATURES = datasets.Features(
    {
        "kind": datasets.Value("string"),
        "image": datasets.Image(),
        "episode_images": datasets.List(datasets.Image()),
        "episode_captions": datasets.List(datasets.Value("string")),
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
MIN_IMAGE_SIZE = 16
MIN_CONTRAST = 100.0  # least RGB distance between the shape colour and any background pixel
SUPERSAMPLE = 4
_BACKGROUND_TRIES = 16


def _check_int(name: str, value: Any, minimum: int) -> None:
    """Raise a ValueError naming `name` unless `value` is an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_attributes(colour: Any, shape: Any, count: Any, position: Any) -> None:
    """Raise a ValueError naming the first attribute that is not in the vocabulary."""
    for name, value, allowed in (
        ("colour", colour, tuple(COLOURS)),
        ("shape", shape, SHAPES),
        ("count", count, tuple(COUNTS)),
        ("position", position, tuple(POSITIONS)),
    ):
        if isinstance(value, bool) or value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def caption_for(attributes: Mapping[str, Any]) -> str:
    """The caption of an image with these attributes: "two red circles on the left".

    Args:
        attributes: a mapping with `colour`, `shape`, `count` (int) and `position`.
    """
    missing = [name for name in ATTRIBUTES if name not in attributes]
    if missing:
        raise ValueError(f"attributes is missing {missing}")
    colour, shape, count, position = (attributes[name] for name in ATTRIBUTES)
    _check_attributes(colour, shape, count, position)
    return f"{COUNTS[count]} {colour} {_plural(shape, count)} {POSITIONS[position]}"


def answer_for(attributes: Mapping[str, Any], asked: str) -> str:
    """The one-word answer to a question about `asked` ("colour", "shape", "count" or "position")."""
    if asked not in ATTRIBUTES:
        raise ValueError(f"asked must be one of {ATTRIBUTES}, got {asked!r}")
    return COUNTS[attributes["count"]] if asked == "count" else attributes[asked]


_SHAPE_WORDS = {word: shape for shape in SHAPES for word in (shape, shape + "s")}
_COUNT_WORDS = {**{word: n for n, word in COUNTS.items()}, **{str(n): n for n in COUNTS}}
_POSITION_WORDS = {**{p: p for p in POSITIONS}, "center": "centre"}


def parse_attributes(text: str) -> dict[str, Any]:
    """The attributes a caption names: the inverse of `caption_for`, and tolerant of free text.

    Returns {"colour", "shape", "count" (int), "position"}, each the first vocabulary word of its kind in `text`
    (number words or digits for the count) or None when the text names none, so a generated caption can be
    scored attribute by attribute.
    """
    words = re.findall(r"[a-z]+|\d+", text.lower())

    def first(vocabulary: Mapping[str, Any]) -> Any:
        return next((vocabulary[w] for w in words if w in vocabulary), None)

    return {
        "colour": first({c: c for c in COLOURS}),
        "shape": first(_SHAPE_WORDS),
        "count": first(_COUNT_WORDS),
        "position": first(_POSITION_WORDS),
    }


def _tint(rng: np.random.Generator, light: bool) -> np.ndarray:
    """A near-grey RGB colour: a light or dark level with a small hue cast (chroma <= 30)."""
    level = rng.uniform(180, 245) if light else rng.uniform(20, 75)
    return np.clip(level + rng.uniform(-15, 15, 3), 0, 255)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) float background: a flat tint, a gradient between two tints, or a noise texture."""
    light = bool(rng.random() < 0.5)
    style = rng.integers(3)
    if style == 0:
        return np.broadcast_to(_tint(rng, light), (size, size, 3)).astype(np.float64)
    if style == 1:
        start, end = _tint(rng, light), _tint(rng, light)
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        ramp = xs * np.cos(angle) + ys * np.sin(angle)
        ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-9)
        return start + (end - start) * ramp[..., None]
    # Noise texture: blotches (a coarse random grid, smoothly upsampled) plus fine grain, both grey so the
    # background stays near-grey.
    grid = int(rng.integers(3, 9))
    coarse = Image.fromarray(rng.normal(0, 14, (grid, grid)).astype(np.float32))  # mode "F"
    blotches = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    grain = rng.normal(0, 5, (size, size))
    return _tint(rng, light) + (blotches + grain)[..., None]


def _contrasting_background(rng: np.random.Generator, size: int, rgb: tuple[int, int, int]) -> np.ndarray:
    """A background whose every pixel is at least `MIN_CONTRAST` from `rgb`, as uint8."""
    colour = np.asarray(rgb, dtype=np.float64)
    for _ in range(_BACKGROUND_TRIES):
        background = np.clip(_background(rng, size), 0, 255)
        if np.linalg.norm(background - colour, axis=-1).min() >= MIN_CONTRAST:
            return background.round().astype(np.uint8)
    # Vanishingly unlikely: the worst colour of the palette (green) has about 1 in 6 backgrounds rejected.
    raise RuntimeError(f"no background contrasting with {rgb} after {_BACKGROUND_TRIES} tries")


def _layout(count: int, position: str, size: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """(centre x, centre y, radius) in pixels of each shape: one per cell of a grid over the position's region."""
    x0, y0, x1, y1 = (v * size for v in REGIONS[position])
    width, height = x1 - x0, y1 - y0
    # Grids (columns, rows) with room for `count` shapes; among those with the largest cells pick one at random,
    # then random cells of it, so e.g. two shapes in the centre sit side by side, stacked, or diagonal.
    grids = [(c, r) for c in range(1, count + 1) for r in range(1, count + 1) if c * r >= count]
    cell_side = {grid: min(width / grid[0], height / grid[1]) for grid in grids}
    best = max(cell_side.values())
    largest = [grid for grid in grids if cell_side[grid] >= best - 1e-9]
    columns, rows = largest[rng.integers(len(largest))]
    cell_w, cell_h = width / columns, height / rows
    radius = 0.5 * best * rng.uniform(0.55, 0.75)
    shapes = []
    for cell in sorted(rng.choice(columns * rows, size=count, replace=False)):
        column, row = cell % columns, cell // columns
        # Jitter within the cell but keep 8% of the cell side clear at its edges, so neighbours stay apart (countable).
        slack_x, slack_y = cell_w / 2 - radius - 0.08 * best, cell_h / 2 - radius - 0.08 * best
        cx = x0 + (column + 0.5) * cell_w + rng.uniform(-slack_x, slack_x)
        cy = y0 + (row + 0.5) * cell_h + rng.uniform(-slack_y, slack_y)
        shapes.append((cx, cy, radius))
    return shapes


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float) -> None:
    """Fill one upright shape of the given radius (half its bounding box) on a mask."""
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    elif shape == "square":
        side = radius * 0.85  # a little smaller than the circle, so both cover a similar area
        draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius * 0.8), (cx - radius, cy + radius * 0.8)], fill=255)
    elif shape == "diamond":
        width = radius * 0.75  # taller than wide, so it never reads as a turned square
        draw.polygon([(cx, cy - radius), (cx + width, cy), (cx, cy + radius), (cx - width, cy)], fill=255)
    else:  # star: five points, inner radius 0.45
        angles = np.linspace(-np.pi / 2, 3 * np.pi / 2, 11)[:-1]
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
        draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)], fill=255)


def render_image(
    colour: str, shape: str, count: int, position: str, image_size: int, rng: np.random.Generator
) -> Image.Image:
    """Draw `count` `colour` `shape`s in the `position` region of a random contrasting background.

    Args:
        colour, shape, count, position: attributes, from `COLOURS`, `SHAPES`, `COUNTS`, `POSITIONS`.
        image_size: side of the square image in pixels (>= `MIN_IMAGE_SIZE`).
        rng: the source of all randomness (background, layout, size), so a seeded generator gives a
            reproducible image.

    Returns:
        An RGB `PIL.Image` of `image_size` × `image_size`.
    """
    _check_attributes(colour, shape, count, position)
    _check_int("image_size", image_size, MIN_IMAGE_SIZE)
    rgb = COLOURS[colour]
    background = Image.fromarray(_contrasting_background(rng, image_size, rgb))
    mask = Image.new("L", (image_size * SUPERSAMPLE, image_size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(mask)
    for cx, cy, radius in _layout(count, position, image_size, rng):
        _draw_shape(draw, shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, radius * SUPERSAMPLE)
    # Box-filtering the supersampled mask gives each pixel its covered fraction: anti-aliased edges.
    mask = mask.resize((image_size, image_size), Image.Resampling.BOX)
    return Image.composite(Image.new("RGB", background.size, rgb), background, mask)


def _png(image: Image.Image) -> dict[str, Any]:
    """The `datasets.Image` storage form: PNG bytes, decoded only when the column is read."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _sample_attributes(
    rng: np.random.Generator, split: str, held_out_fraction: float, avoid: tuple[str, Any] | None = None
) -> dict[str, Any]:
    """Random attributes for `split`; `avoid` = (attribute, value) excludes that value (recall distractors)."""
    use_held_out = split != "train" and rng.random() < held_out_fraction
    pairs = HELD_OUT_PAIRS if use_held_out else TRAIN_PAIRS
    counts, positions = list(COUNTS), list(POSITIONS)
    if avoid is not None:
        name, value = avoid
        if name in ("colour", "shape"):
            column = 0 if name == "colour" else 1
            pairs = tuple(pair for pair in pairs if pair[column] != value)
        elif name == "count":
            counts.remove(value)
        else:
            positions.remove(value)
    colour, shape = pairs[rng.integers(len(pairs))]
    return {
        "colour": colour,
        "shape": shape,
        "count": counts[rng.integers(len(counts))],
        "position": positions[rng.integers(len(positions))],
    }


def _check_arguments(
    image_size: Any,
    episode_size: Any,
    seed: Any,
    kinds: tuple[str, ...],
    held_out_fraction: Any,
    min_episode_size: Any = None,
) -> None:
    _check_int("image_size", image_size, MIN_IMAGE_SIZE)
    _check_int("episode_size", episode_size, 2)
    if min_episode_size is not None:
        _check_int("min_episode_size", min_episode_size, 2)
        if min_episode_size > episode_size:
            raise ValueError(f"min_episode_size must be <= episode_size={episode_size}, got {min_episode_size}")
    _check_int("seed", seed, 0)
    if not kinds or any(kind not in KINDS for kind in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS} without repeats, got {kinds!r}")
    if not isinstance(held_out_fraction, numbers.Real) or not 0.0 <= held_out_fraction <= 1.0:
        raise ValueError(f"held_out_fraction must be a number in [0, 1], got {held_out_fraction!r}")


def _as_kinds(kinds: str | Iterable[str]) -> tuple[str, ...]:
    return (kinds,) if isinstance(kinds, str) else tuple(kinds)


def make_sample(
    split: str,
    index: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    episode_size: int = 4,
    kinds: str | Iterable[str] = KINDS,
    held_out_fraction: float = 0.5,
    min_episode_size: int | None = None,
) -> dict[str, Any]:
    """Sample `index` of `split`, as a row of `FEATURES` with images as PNG bytes.

    The same arguments always give the same row, PNG bytes included. Kinds and recall targets cycle with the
    index (sample i is `kinds[i % len(kinds)]`; the recall rows ask about images 1, 2, …, `episode_size`, 1, …
    in turn), so every split is balanced over kinds and over target positions. With `min_episode_size`, recall
    episodes take every length from `min_episode_size` to `episode_size` in turn (and their targets cycle within
    each length).
    """
    kinds = _as_kinds(kinds)
    _check_arguments(image_size, episode_size, seed, kinds, held_out_fraction, min_episode_size)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_int("index", index, 0)
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    kind = kinds[index % len(kinds)]
    asked = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
    sample: dict[str, Any] = {
        "kind": kind,
        "image": None,
        "episode_images": [],
        "episode_captions": [],
        "answer": "",
        "asked": "",
        "target_index": -1,
    }
    if kind == "recall":
        turn, lengths = index // len(kinds), episode_size - (min_episode_size or episode_size) + 1
        episode_size = episode_size - lengths + 1 + turn % lengths
        target = turn // lengths % episode_size
        attributes = _sample_attributes(rng, split, held_out_fraction)
        episode = [
            attributes
            if step == target
            else _sample_attributes(rng, split, held_out_fraction, avoid=(asked, attributes[asked]))
            for step in range(episode_size)
        ]
        sample["episode_images"] = [_png(render_image(**a, image_size=image_size, rng=rng)) for a in episode]
        sample["episode_captions"] = [caption_for(a) for a in episode]
        sample.update(
            text=RECALL_QUESTIONS[asked].format(n=target + 1),
            answer=answer_for(attributes, asked),
            asked=asked,
            target_index=target,
        )
    else:
        attributes = _sample_attributes(rng, split, held_out_fraction)
        sample["image"] = _png(render_image(**attributes, image_size=image_size, rng=rng))
        if kind == "caption":
            sample["text"] = caption_for(attributes)
        else:
            sample.update(text=QUESTIONS[asked], answer=answer_for(attributes, asked), asked=asked)
    sample.update(attributes)
    sample["held_out"] = (attributes["colour"], attributes["shape"]) in HELD_OUT_PAIRS
    return sample


def edited_recall_sample(sample: Mapping[str, Any], index: int, seed: int = 0) -> dict[str, Any]:
    """A recall `sample` whose asked image is replaced by a new one that differs in the asked attribute (the
    memory-editing test: forget the old image, write the new one in its place, ask again).

    Returns a copy with `episode_images`/`episode_captions` changed at `target_index`, `answer` the new image's
    answer and the new image's attributes; `index` and `seed` fix the new image.
    """
    if sample.get("kind") != "recall":
        raise ValueError(f"edited_recall_sample needs a recall sample, got kind {sample.get('kind')!r}")
    target, asked = sample["target_index"], sample["asked"]
    rng = np.random.default_rng([seed, len(SPLITS), index])
    attributes = _sample_attributes(rng, "test", 0.0, avoid=(asked, sample[asked]))
    size = sample["episode_images"][target].size[0]
    images, captions = list(sample["episode_images"]), list(sample["episode_captions"])
    images[target] = render_image(**attributes, image_size=size, rng=rng)
    captions[target] = caption_for(attributes)
    return {
        **sample,
        **attributes,
        "episode_images": images,
        "episode_captions": captions,
        "answer": answer_for(attributes, asked),
    }


def build_synthetic_dataset(
    num_train: int = 2000,
    num_validation: int = 200,
    num_test: int = 200,
    image_size: int = 64,
    episode_size: int = 4,
    seed: int = 0,
    kinds: str | Iterable[str] = KINDS,
    held_out_fraction: float = 0.5,
    min_episode_size: int | None = None,
) -> datasets.DatasetDict:
    """The built-in set as a `DatasetDict` with train / validation / test splits of the schema `FEATURES`.

    Images are stored as PNG bytes in `datasets.Image` columns and decoded only when a row is read.

    Args:
        num_train, num_validation, num_test: samples per split (>= 0).
        image_size: side of the square images in pixels (>= 16).
        episode_size: images per recall episode (>= 2); the longest, with `min_episode_size`.
        min_episode_size: when given, recall episodes take every length from it to `episode_size` in turn.
        seed: data seed (>= 0); with the split and the sample index it fixes every sample.
        kinds: sample kinds ("caption", "qa", "recall"), taken in turn: sample i is `kinds[i % len(kinds)]`.
        held_out_fraction: in validation and test, the probability that an image uses a `HELD_OUT_PAIRS` pair.
    """
    kinds = _as_kinds(kinds)
    for name, value in (("num_train", num_train), ("num_validation", num_validation), ("num_test", num_test)):
        _check_int(name, value, 0)
    _check_arguments(image_size, episode_size, seed, kinds, held_out_fraction, min_episode_size)
    start = time.perf_counter()
    splits = {}
    for split, size in zip(SPLITS, (num_train, num_validation, num_test)):
        rows = [
            make_sample(
                split,
                index,
                seed=seed,
                image_size=image_size,
                episode_size=episode_size,
                kinds=kinds,
                held_out_fraction=held_out_fraction,
                min_episode_size=min_episode_size,
            )
            for index in range(size)
        ]
        splits[split] = datasets.Dataset.from_dict(
            {name: [row[name] for row in rows] for name in FEATURES},
            features=FEATURES,
            split=datasets.NamedSplit(split),
        )
    logger.info(
        "built the shapes set (%s) at %d px in %.1f s",
        {s: len(d) for s, d in splits.items()},
        image_size,
        time.perf_counter() - start,
    )
    return datasets.DatasetDict(splits)
