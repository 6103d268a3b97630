"""The built-in robot-selection set (EmberVLM's stages 3 and 4): a task described in text, optionally with a
drawing of its scene, and the robot type that should do it, chosen by a documented deterministic rule.

A task has five attributes, each phrased in several ways (plus a phrase that does not matter, such as the time):

* ``setting``: indoor, outdoor or underwater ("in an office", "on a farm", "under the sea", ...)
* ``terrain``: flat, stairs or rough ("along a paved path", "up a flight of stairs", "over loose rubble", ...)
* ``payload``: none, light or heavy ("inspect the sensors", "deliver a small parcel", "haul a full barrel", ...)
* ``height``: ground or high ("on the floor", "near the ceiling", ...)
* ``hands``: whether the task needs hands ("... and turn the valve by hand")

The robot (`ROBOTS`) is the first rule that matches (`robot_for`):

1. underwater setting → underwater robot
2. needs hands → humanoid
3. high and payload not heavy → drone
4. stairs or rough terrain → legged robot
5. otherwise → wheeled robot

Only the underwater robot follows from one attribute: a humanoid needs hands out of the water, a drone a high,
light task without hands, a legged robot rough ground or stairs without a flying task, so a model must combine
words (what the best single-attribute rule gets is reported by `scripts/ember_demo.py`). Classes are balanced:
sample i of a split is drawn for robot `ROBOTS[i % 5]`, its attributes uniformly among the combinations
(`ALL_TASKS`) that the rule gives that robot.

The optional image draws the scene with shapes and colours only, never text (the seed's set wrote the label onto
its images): the setting as the background (sky and grass, walls and floor, deep blue water), the terrain as a
flat ground line, a staircase or scattered rocks, the payload as nothing, a small box or a large box, placed on
the ground or high up, and a yellow valve wheel beside it when the task needs hands.

Everything is deterministic by (seed, split, index), like `synthetic_shapes.py`.

Columns:

==========  ==================  =====================================================================
column      type                value
==========  ==================  =====================================================================
kind        string              "robot" (the collator's sample kind)
image       Image (PNG, lazy)   the scene, or None when built with `with_images=False`
text        string              the task and the question, e.g. "task: haul a full barrel on the floor
                                up a flight of stairs in an office this morning. which robot fits best?"
answer      string              the robot type, e.g. "legged robot"
label       ClassLabel          index of `answer` in `ROBOTS`
setting     string              indoor / outdoor / underwater
terrain     string              flat / stairs / rough
payload     string              none / light / heavy
height      string              ground / high
hands       bool                the task needs hands
==========  ==================  =====================================================================
"""

import io
import itertools
import logging
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw


logger = logging.getLogger(__name__)

ROBOTS = ("drone", "underwater robot", "humanoid", "wheeled robot", "legged robot")
SETTINGS = ("indoor", "outdoor", "underwater")
TERRAINS = ("flat", "stairs", "rough")
PAYLOADS = ("none", "light", "heavy")
HEIGHTS = ("ground", "high")
SPLITS = ("train", "validation", "test")
QUESTION = "which robot fits best?"
PHRASES: dict[str, dict[Any, tuple[str, ...]]] = {
    "payload": {
        "none": ("inspect the sensors", "photograph a crack in the wall", "check the gauges", "survey the pipes"),
        "light": ("deliver a small parcel", "bring a letter", "fetch a phone", "carry a bottle of water"),
        "heavy": ("haul a full barrel", "carry a heavy crate", "move a stack of bricks", "lift a large engine part"),
    },
    "hands": {
        False: ("",),
        True: (
            " and turn the valve by hand",
            " and open the door latch",
            " and plug in the cable",
            " and tighten the bolts",
        ),
    },
    "height": {
        "ground": ("on the floor", "at ground level", "near the ground"),
        "high": ("on a high shelf", "near the ceiling", "at the top of a tall tower", "on a rooftop"),
    },
    "terrain": {
        "flat": ("across a smooth floor", "along a paved path", "over flat ground"),
        "stairs": ("up a flight of stairs", "down a steep staircase", "past several steps"),
        "rough": ("over loose rubble", "through deep mud", "across rocky ground"),
    },
    "setting": {
        "indoor": ("inside a warehouse", "in an office", "in a hospital"),
        "outdoor": ("in a forest", "on a farm", "at a construction site"),
        "underwater": ("at the bottom of a lake", "beside a sunken ship", "under the sea"),
    },
    "when": {None: ("", " this morning", " before noon", " for the red team", " during the night")},
}
FEATURES = datasets.Features(
    {
        "kind": datasets.Value("string"),
        "image": datasets.Image(),
        "text": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "label": datasets.ClassLabel(names=list(ROBOTS)),
        "setting": datasets.Value("string"),
        "terrain": datasets.Value("string"),
        "payload": datasets.Value("string"),
        "height": datasets.Value("string"),
        "hands": datasets.Value("bool"),
    }
)
ATTRIBUTES = ("setting", "terrain", "payload", "height", "hands")
ALL_TASKS = tuple(
    dict(zip(ATTRIBUTES, values)) for values in itertools.product(SETTINGS, TERRAINS, PAYLOADS, HEIGHTS, (False, True))
)


def robot_for(task: dict[str, Any]) -> str:
    """The robot type for a task's attributes: the first matching rule of the module docstring."""
    if task["setting"] == "underwater":
        return "underwater robot"
    if task["hands"]:
        return "humanoid"
    if task["height"] == "high" and task["payload"] != "heavy":
        return "drone"
    if task["terrain"] in ("stairs", "rough"):
        return "legged robot"
    return "wheeled robot"


def describe(task: dict[str, Any], rng: np.random.Generator) -> str:
    """The task's text: one phrasing per attribute, drawn from `PHRASES` with `rng`, then the question."""

    def phrase(attribute: str, value: Any = None) -> str:
        options = PHRASES[attribute][value]
        return options[rng.integers(len(options))]

    words = (
        f"task: {phrase('payload', task['payload'])}{phrase('hands', task['hands'])} "
        f"{phrase('height', task['height'])} {phrase('terrain', task['terrain'])} "
        f"{phrase('setting', task['setting'])}{phrase('when')}."
    )
    return f"{words} {QUESTION}"


# Background colours of the scene: (upper part, ground) per setting.
BACKGROUNDS = {
    "outdoor": ((150, 200, 240), (90, 160, 80)),  # sky, grass
    "indoor": ((215, 200, 170), (120, 120, 125)),  # wall, floor
    "underwater": ((20, 50, 120), (70, 80, 60)),  # water, seabed
}


def render_scene(task: dict[str, Any], image_size: int, rng: np.random.Generator) -> Image.Image:
    """The task's scene as an `image_size`² RGB picture of shapes and colours (no text; see the docstring)."""
    size = image_size
    top, bottom = BACKGROUNDS[task["setting"]]
    image = Image.new("RGB", (size, size), top)
    draw = ImageDraw.Draw(image)
    ground = int(size * rng.uniform(0.68, 0.76))
    draw.rectangle([0, ground, size, size], fill=bottom)
    if task["terrain"] == "stairs":
        steps, width = 4, size * 0.45 / 4
        for step in range(steps):
            x0 = size * 0.05 + step * width
            draw.rectangle([x0, ground - (step + 1) * size * 0.07, x0 + width, ground], fill=(90, 90, 95))
    elif task["terrain"] == "rough":
        for _ in range(6):
            cx, cy, r = rng.uniform(0, size), rng.uniform(ground, size), size * rng.uniform(0.03, 0.07)
            draw.polygon([(cx - r, cy + r), (cx, cy - r), (cx + r, cy + r * 0.6)], fill=(60, 45, 35))
    else:
        draw.line([0, ground, size, ground], fill=(40, 40, 40), width=max(1, size // 32))
    x = size * rng.uniform(0.55, 0.75)
    y = size * rng.uniform(0.15, 0.25) if task["height"] == "high" else ground
    if task["height"] == "high":  # a shelf or ledge the object sits on
        draw.rectangle([x - size * 0.15, y, x + size * 0.15, y + size * 0.03], fill=(100, 70, 40))
    box = {"none": 0.0, "light": 0.08, "heavy": 0.18}[task["payload"]] * size
    if box:
        draw.rectangle([x - box / 2, y - box, x + box / 2, y], fill=(170, 110, 50), outline=(60, 40, 20))
    else:  # a sensor to look at: a small dark disc
        r = size * 0.04
        draw.ellipse([x - r, y - 2 * r, x + r, y], fill=(30, 30, 30))
    if task["hands"]:
        r, vx, vy = size * 0.05, x - size * 0.2, y - size * 0.06
        draw.ellipse([vx - r, vy - r, vx + r, vy + r], outline=(240, 210, 0), width=max(1, size // 32))
        draw.line([vx - r, vy, vx + r, vy], fill=(240, 210, 0), width=max(1, size // 64))
        draw.line([vx, vy - r, vx, vy + r], fill=(240, 210, 0), width=max(1, size // 64))
    return image


def make_robot_sample(
    split: str, index: int, seed: int = 0, image_size: int = 64, with_images: bool = True
) -> dict[str, Any]:
    """Sample `index` of `split` as a row of `FEATURES` (image as PNG bytes): robot `ROBOTS[index % 5]`, its task
    drawn uniformly among `ALL_TASKS` that the rule gives it, then phrased and drawn."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    robot = ROBOTS[index % len(ROBOTS)]
    candidates = [task for task in ALL_TASKS if robot_for(task) == robot]
    task = candidates[rng.integers(len(candidates))]
    image = None
    if with_images:
        buffer = io.BytesIO()
        render_scene(task, image_size, rng).save(buffer, format="PNG")
        image = {"bytes": buffer.getvalue(), "path": None}
    return {
        "kind": "robot",
        "image": image,
        "text": describe(task, rng),
        "answer": robot,
        "label": ROBOTS.index(robot),
        **task,
    }


def build_robot_selection_dataset(
    num_train: int = 2000,
    num_validation: int = 200,
    num_test: int = 500,
    image_size: int = 64,
    seed: int = 0,
    with_images: bool = True,
) -> datasets.DatasetDict:
    """The robot-selection set as a `DatasetDict` with train / validation / test splits of the schema `FEATURES`.

    Args:
        num_train, num_validation, num_test: samples per split (>= 0).
        image_size: side of the square scene images in pixels.
        seed: data seed; with the split and the sample index it fixes every sample.
        with_images: draw each task's scene (`image`); without, `image` is None and rows are text only.
    """
    splits = {}
    for split, size in zip(SPLITS, (num_train, num_validation, num_test)):
        if size < 0:
            raise ValueError(f"num_{split} must be >= 0, got {size}")
        rows = [make_robot_sample(split, index, seed, image_size, with_images) for index in range(size)]
        splits[split] = datasets.Dataset.from_dict(
            {name: [row[name] for row in rows] for name in FEATURES},
            features=FEATURES,
            split=datasets.NamedSplit(split),
        )
    logger.info("built the robot-selection set %s", {s: len(d) for s, d in splits.items()})
    return datasets.DatasetDict(splits)
