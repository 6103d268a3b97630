"""Data for MicroVLM: the built-in shapes set, other image–text sources, and the batch collator."""

from .collator import MicroVLMCollator
from .synthetic_shapes import (
    COLOURS,
    COUNTS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    answer_for,
    build_synthetic_dataset,
    caption_for,
    make_sample,
    parse_attributes,
    render_image,
)


__all__ = [
    "COLOURS",
    "COUNTS",
    "HELD_OUT_PAIRS",
    "POSITIONS",
    "SHAPES",
    "MicroVLMCollator",
    "answer_for",
    "build_synthetic_dataset",
    "caption_for",
    "make_sample",
    "parse_attributes",
    "render_image",
]
