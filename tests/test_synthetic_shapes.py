"""The built-in shapes set: determinism, held-out pairs, text grammar, recall targets, pixels, lazy images, errors."""

import itertools
from collections import deque

import datasets
import numpy as np
import pytest
from PIL import Image

from microvlm.data import synthetic_shapes
from microvlm.data.synthetic_shapes import (
    ATTRIBUTES,
    COLOURS,
    COUNTS,
    HELD_OUT_PAIRS,
    KINDS,
    MIN_CONTRAST,
    POSITIONS,
    QUESTIONS,
    RECALL_QUESTIONS,
    SHAPES,
    TRAIN_PAIRS,
    answer_for,
    build_synthetic_dataset,
    caption_for,
    make_sample,
    parse_attributes,
    render_image,
)

EPISODE_SIZE = 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def shapes() -> datasets.DatasetDict:
    return build_synthetic_dataset(
        num_train=300, num_validation=100, num_test=200, image_size=32, episode_size=EPISODE_SIZE, seed=0
    )


def attributes_of(row: dict) -> dict:
    return {name: row[name] for name in ATTRIBUTES}


def shape_mask(image: Image.Image) -> np.ndarray:
    """Pixels of high chroma: the shapes (backgrounds are near-grey), found without knowing the shape colour."""
    pixels = np.asarray(image, dtype=int)
    return (pixels.max(-1) - pixels.min(-1)) > 90


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """`mask` grown by `radius` pixels in every direction (square neighbourhood)."""
    padded = np.pad(mask, radius)
    height, width = mask.shape
    grown = np.zeros_like(mask)
    for dy, dx in itertools.product(range(2 * radius + 1), repeat=2):
        grown |= padded[dy : dy + height, dx : dx + width]
    return grown


def components(mask: np.ndarray) -> int:
    """Number of 8-connected regions of a boolean mask."""
    seen = np.zeros_like(mask)
    found = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        found += 1
        seen[start] = True
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for dy, dx in itertools.product((-1, 0, 1), repeat=2):
                ny, nx = y + dy, x + dx
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return found


def test_same_seed_gives_identical_bytes_and_another_seed_differs():
    kwargs = {"num_train": 9, "num_validation": 3, "num_test": 3, "image_size": 32, "episode_size": 2}
    a, b, c = (build_synthetic_dataset(seed=seed, **kwargs) for seed in (7, 7, 8))
    for split in a:
        # Raw Arrow tables: the PNG bytes themselves, not decoded images.
        assert a[split].data.table.equals(b[split].data.table)
        assert not a[split].data.table.equals(c[split].data.table)
    assert make_sample("test", 5, seed=7) == make_sample("test", 5, seed=7)
    first = np.asarray(render_image("blue", "star", 3, "top", 64, np.random.default_rng(1)))
    again = np.asarray(render_image("blue", "star", 3, "top", 64, np.random.default_rng(1)))
    other = np.asarray(render_image("blue", "star", 3, "top", 64, np.random.default_rng(2)))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_held_out_pairs_never_in_train_but_in_validation_and_test(shapes):
    held_out = set(HELD_OUT_PAIRS)

    def pairs(split: str) -> set[tuple[str, str]]:
        # Every image of the split: the sample's own and every recall distractor.
        found = set()
        for row in shapes[split].select_columns(["colour", "shape", "episode_captions"]):
            found.add((row["colour"], row["shape"]))
            found |= {(p["colour"], p["shape"]) for p in map(parse_attributes, row["episode_captions"])}
        return found

    assert not pairs("train") & held_out
    assert pairs("validation") & held_out and pairs("test") & held_out
    test = shapes["test"]
    assert test["held_out"] == [pair in held_out for pair in zip(test["colour"], test["shape"])]
    assert 0.35 < np.mean(test["held_out"]) < 0.65  # held_out_fraction = 0.5


def test_held_out_fraction_zero_and_one():
    only_seen = build_synthetic_dataset(0, 0, 40, image_size=16, held_out_fraction=0.0)["test"]
    only_held_out = build_synthetic_dataset(0, 0, 40, image_size=16, held_out_fraction=1.0)["test"]
    assert not any(only_seen["held_out"]) and all(only_held_out["held_out"])


def test_every_attribute_value_appears_in_train(shapes):
    train = shapes["train"]
    assert set(train["colour"]) == set(COLOURS) and set(train["shape"]) == set(SHAPES)
    assert set(train["count"]) == set(COUNTS) and set(train["position"]) == set(POSITIONS)
    assert set(train["kind"]) == set(KINDS)
    # By construction too: each colour and each shape keeps a train pair.
    assert {c for c, _ in TRAIN_PAIRS} == set(COLOURS) and {s for _, s in TRAIN_PAIRS} == set(SHAPES)


def test_held_out_pairs_are_documented():
    for colour, shape in HELD_OUT_PAIRS:
        assert f"{colour} {shape}" in synthetic_shapes.__doc__


def test_captions_follow_the_grammar_and_round_trip():
    assert caption_for({"colour": "red", "shape": "circle", "count": 2, "position": "left"}) == (
        "two red circles on the left"
    )
    assert (
        caption_for({"colour": "blue", "shape": "star", "count": 1, "position": "top"}) == "one blue star at the top"
    )
    assert caption_for({"colour": "green", "shape": "diamond", "count": 4, "position": "centre"}) == (
        "four green diamonds in the centre"
    )
    for colour, shape, count, position in itertools.product(COLOURS, SHAPES, COUNTS, POSITIONS):
        attributes = {"colour": colour, "shape": shape, "count": count, "position": position}
        assert parse_attributes(caption_for(attributes)) == attributes


def test_parse_attributes_reads_free_text_and_reports_missing_values():
    assert parse_attributes("I see 3 Yellow Diamonds, in the center.") == {
        "colour": "yellow",
        "shape": "diamond",
        "count": 3,
        "position": "centre",
    }
    assert parse_attributes("a purple thing") == {"colour": "purple", "shape": None, "count": None, "position": None}


def test_rows_are_consistent_for_every_kind(shapes):
    for row in shapes["train"].select(range(90)):
        attributes = attributes_of(row)
        assert row["held_out"] == ((row["colour"], row["shape"]) in HELD_OUT_PAIRS)
        if row["kind"] == "caption":
            assert row["text"] == caption_for(attributes) and row["answer"] == "" and row["asked"] == ""
        elif row["kind"] == "qa":
            assert row["text"] == QUESTIONS[row["asked"]] and row["answer"] == answer_for(attributes, row["asked"])
        if row["kind"] == "recall":
            assert row["image"] is None and 0 <= row["target_index"] < EPISODE_SIZE
            assert len(row["episode_images"]) == len(row["episode_captions"]) == EPISODE_SIZE
        else:
            assert row["target_index"] == -1 and row["episode_images"] == [] and row["episode_captions"] == []
    assert answer_for({"colour": "red", "shape": "circle", "count": 2, "position": "left"}, "count") == "two"


def test_recall_answers_describe_the_image_at_target_index_and_only_it(shapes):
    recalls = [row for row in shapes["test"] if row["kind"] == "recall"]
    assert len(recalls) > 30
    for row in recalls:
        target, asked = row["target_index"], row["asked"]
        episode = [parse_attributes(caption) for caption in row["episode_captions"]]
        assert episode[target] == attributes_of(row)
        assert row["answer"] == answer_for(episode[target], asked)
        assert row["text"] == RECALL_QUESTIONS[asked].format(n=target + 1)
        # Distractors never share the asked value, so recalling another image gives a wrong answer.
        assert all(step[asked] != episode[target][asked] for i, step in enumerate(episode) if i != target)


def test_kinds_and_recall_targets_are_balanced(shapes):
    kinds = shapes["validation"]["kind"]
    assert kinds == [KINDS[i % len(KINDS)] for i in range(len(kinds))]
    targets = [t for t, kind in zip(shapes["validation"]["target_index"], kinds) if kind == "recall"]
    assert targets == [i % EPISODE_SIZE for i in range(len(targets))]


def test_kinds_restrict_the_samples():
    assert set(build_synthetic_dataset(12, 0, 0, image_size=16, kinds=("qa",))["train"]["kind"]) == {"qa"}
    assert set(build_synthetic_dataset(12, 0, 0, image_size=16, kinds="recall")["train"]["kind"]) == {"recall"}


@pytest.mark.parametrize("size", [32, 64, 224])
@pytest.mark.parametrize("colour", list(COLOURS))
def test_rendered_pixels_show_the_named_colour_count_and_position(colour, size):
    rng = np.random.default_rng(size)
    regions = {
        "left": (0, 0.45, 0, 1),
        "right": (0.55, 1, 0, 1),
        "top": (0, 1, 0, 0.45),
        "bottom": (0, 1, 0.55, 1),
        "centre": (0.3, 0.7, 0.3, 0.7),
    }
    for shape, position in zip(SHAPES, itertools.cycle(POSITIONS)):
        count = int(rng.integers(1, 5))
        image = render_image(colour, shape, count, position, size, rng)
        assert image.size == (size, size) and image.mode == "RGB"
        mask = shape_mask(image)
        # Dominant high-chroma colour is nearest to the named colour.
        dominant = np.median(np.asarray(image, dtype=float)[mask], axis=0)
        assert min(COLOURS, key=lambda name: np.linalg.norm(dominant - COLOURS[name])) == colour
        # Shapes sit in the named region.
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = regions[position]
        assert x0 * size <= xs.mean() <= x1 * size and y0 * size <= ys.mean() <= y1 * size
        # Shapes are separate blobs of the named colour, as many as named; away from their anti-aliased edges
        # (2 px) every background pixel is at least MIN_CONTRAST from the shape colour.
        distance = np.linalg.norm(np.asarray(image, dtype=float) - COLOURS[colour], axis=-1)
        core = distance < 60
        assert components(core) == count
        assert not (distance < MIN_CONTRAST)[~dilate(core, 2)].any()


def test_images_are_png_bytes_decoded_lazily_at_the_requested_size():
    built = build_synthetic_dataset(4, 0, 0, image_size=224, episode_size=2, kinds=("caption", "recall"), seed=3)
    train = built["train"]
    assert isinstance(train.features["image"], datasets.Image) and train.features["image"].decode
    table = train.data.table
    stored = [cell["bytes"] for cell in table.column("image").to_pylist() if cell is not None]
    stored += [item["bytes"] for cell in table.column("episode_images").to_pylist() for item in cell]
    assert stored and all(blob.startswith(PNG_MAGIC) for blob in stored)
    for row in train:
        for image in [row["image"]] if row["kind"] == "caption" else row["episode_images"]:
            assert isinstance(image, Image.Image) and image.size == (224, 224) and image.mode == "RGB"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_train": -1}, "num_train"),
        ({"num_validation": -2}, "num_validation"),
        ({"num_test": -3}, "num_test"),
        ({"image_size": -64}, "image_size"),
        ({"image_size": 8}, "image_size"),
        ({"image_size": 32.5}, "image_size"),
        ({"episode_size": 1}, "episode_size"),
        ({"episode_size": -4}, "episode_size"),
        ({"seed": -1}, "seed"),
        ({"kinds": ("caption", "poems")}, "kinds"),
        ({"kinds": ()}, "kinds"),
        ({"held_out_fraction": 1.5}, "held_out_fraction"),
    ],
)
def test_bad_build_arguments_raise_value_errors_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_synthetic_dataset(**{"num_train": 1, "num_validation": 0, "num_test": 0, **kwargs})


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: render_image("teal", "circle", 1, "left", 32, np.random.default_rng(0)), "colour"),
        (lambda: render_image("red", "hexagon", 1, "left", 32, np.random.default_rng(0)), "shape"),
        (lambda: render_image("red", "circle", 5, "left", 32, np.random.default_rng(0)), "count"),
        (lambda: render_image("red", "circle", 1, "middle", 32, np.random.default_rng(0)), "position"),
        (lambda: render_image("red", "circle", 1, "left", 0, np.random.default_rng(0)), "image_size"),
        (lambda: caption_for({"colour": "red", "shape": "circle", "count": 1}), "attributes"),
        (lambda: answer_for({"colour": "red"}, "size"), "asked"),
        (lambda: make_sample("dev", 0), "split"),
        (lambda: make_sample("train", -1), "index"),
    ],
)
def test_bad_attributes_raise_value_errors_naming_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_min_episode_size_gives_every_length_in_turn_with_targets_inside_the_episode():
    rows = [
        make_sample("train", i, kinds=("recall",), image_size=16, episode_size=5, min_episode_size=2)
        for i in range(16)
    ]
    assert [len(r["episode_images"]) for r in rows[:8]] == [2, 3, 4, 5, 2, 3, 4, 5]
    assert all(0 <= r["target_index"] < len(r["episode_images"]) == len(r["episode_captions"]) for r in rows)
    assert {r["target_index"] for r in rows if len(r["episode_images"]) == 5} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="min_episode_size"):
        make_sample("train", 0, episode_size=3, min_episode_size=4)
