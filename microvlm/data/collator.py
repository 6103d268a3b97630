"""Batches for MicroVLM training and evaluation: prompt + target sequences, and episodes for the memory.

Sample formats (columns of the built-in set, `synthetic_shapes.py`; any image–text source has `image` + `text`):

* caption: the image prefix is the prompt, the caption the target.
* qa: image prefix + question is the prompt, the short answer the target.
* recall: no image in the input; the question about image i of an episode is the prompt, the answer the target,
  and the episode (image + "image i: caption" for each step) is written to the row's memory first.
* robot (`robot_selection.py`): the scene's image prefix (when the row has an image) + the task is the prompt, the
  robot type the target; its class index goes to `answer_targets` (the reasoning module's answer head).

Labels cover the target (and the EOS after it) only. With `with_episodes`, recall rows carry their episode and
the index of the step they ask about (`memory_target_step`, the addressing loss's target); other rows carry an
empty episode (all steps masked), so they read the prior and ScopeNet learns to gate them off.
"""

import logging
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image


logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def episode_step_text(index: int, caption: str) -> str:
    """Text written with the image of episode step `index` (0-based; shown 1-based as in the questions)."""
    return f"image {index + 1}: {caption}"


def prompt_and_target(sample: dict[str, Any]) -> tuple[str, str, bool]:
    """(prompt text, target text, has image) of one sample."""
    kind = sample.get("kind") or "caption"
    if kind == "caption":
        return "", sample["text"], True
    if kind == "qa":
        return sample["text"], sample["answer"], True
    if kind == "recall":
        return sample["text"], sample["answer"], False
    if kind == "robot":
        return sample["text"], sample["answer"], sample.get("image") is not None
    raise ValueError(f"sample column 'kind' must be caption, qa, recall or robot, got {kind!r}")


@dataclass
class MicroVLMCollator:
    """Collates samples into `input_ids`, `attention_mask`, `labels`, `pixel_values` (one image per row; rows
    without an image get none of the image's placeholders and a blank image is not sent), `scope_targets`
    (1 for recall rows), `answer_targets` (B,) when a row is a robot row (its `label`; -100 for other rows) and,
    with `with_episodes` and at least one recall row, `episode_*` tensors (B, E, ...)
    and `memory_target_step` (B,).

    `processor` is a [`MicroVLMProcessor`]: its tokenizer, image processor, image token and image-token count.
    With `prompts_only`, rows hold the prompt alone (labels are all ignored), ready for `generate`.
    Sequences are left-padded (the model counts positions over real tokens, so padding never moves them).
    """

    processor: Any
    with_episodes: bool = False
    max_length: int = 64
    prompts_only: bool = False  # for generation: the prompt alone, no target and no labels

    def __post_init__(self) -> None:
        tokenizer = self.processor.tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.processor.image_token)
        self.image_tokens = [self.image_token_id] * self.processor.num_image_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id

    def _tokens(self, text: str) -> list[int]:
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor.image_processor([image.convert("RGB") for image in images], return_tensors="pt")[
            "pixel_values"
        ]

    def _left_pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(row) for row in rows)
        return torch.tensor([[value] * (width - len(row)) + row for row in rows], dtype=torch.long)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, labels, images = [], [], []
        for sample in samples:
            prompt, target, has_image = prompt_and_target(sample)
            prompt_ids = (self.image_tokens if has_image else []) + self._tokens(prompt)
            target_ids = [] if self.prompts_only else self._tokens((" " if prompt else "") + target) + [self.eos_id]
            ids = (prompt_ids + target_ids)[: self.max_length]
            input_ids.append(ids)
            labels.append(([IGNORE_INDEX] * len(prompt_ids) + target_ids)[: self.max_length])
            if has_image:
                images.append(sample["image"])
        batch = {
            "input_ids": self._left_pad(input_ids, self.pad_id),
            "attention_mask": self._left_pad([[1] * len(ids) for ids in input_ids], 0),
            "labels": self._left_pad(labels, IGNORE_INDEX),
            "scope_targets": torch.tensor([float(s.get("kind") == "recall") for s in samples]),
        }
        if images:
            batch["pixel_values"] = self._pixels(images)
        if any(s.get("kind") == "robot" for s in samples):
            labels = [s["label"] if s.get("kind") == "robot" else IGNORE_INDEX for s in samples]
            batch["answer_targets"] = torch.tensor(labels)
        if self.with_episodes:
            batch.update(self._episodes(samples))
        return batch

    def _episodes(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Recall rows' episodes as (image, "image i: caption") steps, padded to the longest with masked steps
        (blank pixels, no text); other rows get only masked steps. Empty when no row is a recall row."""
        episodes = [
            list(zip(s["episode_images"], s["episode_captions"])) if s.get("kind") == "recall" else [] for s in samples
        ]
        steps = max(len(episode) for episode in episodes)
        if steps == 0:
            return {}
        step_ids, step_mask, images, real_index = [], [], [], []
        for episode in episodes:
            for index in range(steps):
                real = index < len(episode)
                text = episode_step_text(index, episode[index][1]) if real else ""
                step_ids.append(self.image_tokens + self._tokens(text))
                step_mask.append(float(real))
                if real:
                    images.append(episode[index][0])
                    real_index.append(len(step_ids) - 1)
        ids = self._left_pad(step_ids, self.pad_id)
        batch, width = len(samples), ids.shape[1]
        real_pixels = self._pixels(images)
        pixels = real_pixels.new_zeros(len(step_ids), *real_pixels.shape[1:])
        pixels[real_index] = real_pixels
        return {
            "episode_input_ids": ids.view(batch, steps, width),
            "episode_attention_mask": self._left_pad([[1] * len(s) for s in step_ids], 0).view(batch, steps, width),
            "episode_pixel_values": pixels.view(batch, steps, *pixels.shape[1:]),
            "episode_mask": torch.tensor(step_mask).view(batch, steps),
            "memory_target_step": torch.tensor(
                [s["target_index"] if s.get("kind") == "recall" else IGNORE_INDEX for s in samples]
            ),
        }
