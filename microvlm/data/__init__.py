"""Data for MicroVLM: the built-in shapes set, other image–text sources, and the batch collator."""

from .collator import MicroVLMCollator
from .synthetic_shapes import build_synthetic_dataset, caption_for, parse_attributes

__all__ = ["MicroVLMCollator", "build_synthetic_dataset", "caption_for", "parse_attributes"]
