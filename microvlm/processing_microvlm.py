"""MicroVLMProcessor: images → `pixel_values` (DeiT-style resize / crop / normalise), texts → `input_ids` with
each image placeholder expanded to the model's `num_image_tokens` (LLaVA's convention)."""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name
from transformers.processing_utils import ProcessingKwargs

from .configuration_microvlm import MicroVLMConfig

# transformers 5.0 copies only the direct relative imports of a remote-code module: name the modules
# configuration_microvlm imports, so that a folder with the processor alone loads too.
from .repvit import RepViTConfig  # noqa: F401
from .two_stream_vision import TwoStreamVisionConfig  # noqa: F401


logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).parent
IGNORE_INDEX = -100


class MicroVLMProcessorKwargs(ProcessingKwargs, total=False):
    """transformers' per-modality kwargs (`text_kwargs`, `images_kwargs`, or flat); texts are padded by default."""

    _defaults = {"text_kwargs": {"padding": True}}


def to_rgb_image(image: Any, index: int = 0) -> Image.Image:
    """A PIL RGB image from a PIL image of any mode, an (H, W[, 1|3|4]) array (uint8, or float in [0, 1]), a torch
    tensor of that shape or channels-first (C, H, W), or a file path; transparency is composited on white. Raises
    ValueError naming image `index` and the problem."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"image {index}: cannot read {str(image)!r} as an image ({error})") from error
    elif isinstance(image, np.ndarray):
        image = _array_to_image(image, index)
    elif not isinstance(image, Image.Image):
        raise ValueError(
            f"image {index}: expected a PIL.Image, a numpy array, a torch tensor or a file path, "
            f"got {type(image).__name__}"
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image {index}: zero-size image ({image.width}x{image.height})")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_image(array: np.ndarray, index: int) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"image {index}: expected an array of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}"
        )
    if 0 in array.shape:
        raise ValueError(f"image {index}: zero-size image (array shape {array.shape})")
    if np.issubdtype(array.dtype, np.floating):
        array = (np.clip(array, 0.0, 1.0) * 255).round()
    return Image.fromarray(array.astype(np.uint8))


class MicroVLMProcessor(ProcessorMixin):
    r"""Image processor + tokenizer for [`MicroVLMForCausalLM`].

    Args:
        image_processor: a DeiT/ViT-style image processor (`AutoImageProcessor`).
        tokenizer: the language model's tokenizer.
        image_token (`str`): the placeholder token (`<image>` for the tiny tokenizer, `<|image_pad|>` for Qwen).
        num_image_tokens (`int`): how many placeholders one image becomes (the model's `num_image_tokens`).
        chat_template (`str`, *optional*): a Jinja chat template; `{"type": "image"}` items become the placeholder.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_token: str = "<image>",
        num_image_tokens: int = 8,
        chat_template: str | None = None,
        **kwargs,
    ):
        self.image_token = image_token
        self.num_image_tokens = num_image_tokens
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if tokenizer is not None:
            self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
            if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
                raise ValueError(f"MicroVLMProcessor: the tokenizer has no token {image_token!r} for images")

    valid_processor_kwargs = MicroVLMProcessorKwargs

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def __call__(self, images=None, text=None, suffix=None, **kwargs) -> BatchFeature:
        """Tokenise texts and preprocess their images (one image per text at most); with `suffix`, a training batch.

        `images`: one image, a list with one image per text, or a list with one list per text holding zero or one
        image (the nested form chat templates produce); PIL images, arrays, torch tensors or file paths. `text`: a
        string or a list. A text with a placeholder gets it expanded to `num_image_tokens`; a text without one,
        given an image, gets them in front. `suffix`: the target of each text (PaliGemma's convention): each row
        becomes prompt + target + EOS and `labels` (B, T) cover the target and EOS only.

        Keyword arguments follow transformers' `ProcessingKwargs`: flat or as `text_kwargs` / `images_kwargs`
        (`padding`, `max_length`, `truncation`, `padding_side`; `do_normalize`, `size`, ...; `return_tensors`,
        default "pt"). Truncation never cuts into an image's placeholders: that raises, naming the length needed.
        """
        if images is None and text is None:
            raise ValueError("MicroVLMProcessor: give images, text, or both")
        # Tensors are made once, at the end (transformers 5.0 leaves a flat return_tensors out of text_kwargs).
        return_tensors = kwargs.pop("return_tensors", "pt")
        output_kwargs = self._merge_kwargs(
            MicroVLMProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs, images_kwargs = output_kwargs["text_kwargs"], output_kwargs["images_kwargs"]
        text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        return_replacements = text_kwargs.pop("return_text_replacement_offsets", False)
        texts = [text] if isinstance(text, str) else list(text) if text is not None else None
        image_list = None if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        if texts is None:
            texts = [""] * len(image_list)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(
                f"MicroVLMProcessor: text must be a string or a list of strings, got {type(text).__name__}"
            )
        per_text = [None] * len(texts) if image_list is None else self._one_image_per_text(image_list, len(texts))
        data: dict[str, Any] = {}
        prompts = []
        for index, (prompt, image) in enumerate(zip(texts, per_text)):
            count = prompt.count(self.image_token)
            if count > 1:
                raise ValueError(
                    f"MicroVLMProcessor: text {index} holds more than one {self.image_token!r}; one image per text"
                )
            if image is None and count:
                raise ValueError(
                    f"MicroVLMProcessor: text {index} holds {self.image_token!r} but no image was given for it"
                )
            prompts.append(prompt if count or image is None else self.image_token + prompt)
        present = [to_rgb_image(image, index) for index, image in enumerate(per_text) if image is not None]
        if present:
            data.update(self.image_processor(present, return_tensors="pt", **images_kwargs))
        expanded = [t.replace(self.image_token, self.image_token * self.num_image_tokens) for t in prompts]
        if suffix is None:
            data.update(self.tokenizer(expanded, **text_kwargs))
        else:
            data.update(self._with_labels(expanded, [suffix] if isinstance(suffix, str) else suffix, text_kwargs))
        self._check_placeholders(data["input_ids"], [image is not None for image in per_text], text_kwargs)
        if return_replacements:
            data["text_replacement_offsets"] = [self._replacement_offsets(t, p) for t, p in zip(texts, prompts)]
        # The offsets stay Python lists (`skip_tensor_conversion`: only the releases that ask for them have it).
        skip = {"skip_tensor_conversion": ["text_replacement_offsets"]} if return_replacements else {}
        return BatchFeature(data=data, tensor_type=return_tensors, **skip)

    def _with_labels(self, prompts: list[str], targets: list[str], text_kwargs: dict[str, Any]) -> dict[str, Any]:
        """prompt + " " + target + EOS per row (no space after an image-only or whitespace-ending prompt), padded
        as `text_kwargs` say, with `labels` on the target and EOS only."""
        if len(targets) != len(prompts):
            raise ValueError(f"MicroVLMProcessor: got {len(targets)} suffixes for {len(prompts)} texts; one per text")
        pad_keys = ("padding", "max_length", "pad_to_multiple_of", "padding_side")
        pad_kwargs = {key: text_kwargs.pop(key) for key in pad_keys if key in text_kwargs}
        max_length = pad_kwargs.get("max_length") if text_kwargs.pop("truncation", False) else None
        text_kwargs.pop("return_offsets_mapping", None)
        rows, labels = [], []
        for prompt, target in zip(prompts, targets):
            words = prompt.replace(self.image_token, "")
            separator = " " if words and not words[-1].isspace() else ""
            prompt_ids = self.tokenizer(prompt, **text_kwargs)["input_ids"]
            target_ids = self.tokenizer(separator + target, add_special_tokens=False)["input_ids"]
            target_ids = target_ids + [self.tokenizer.eos_token_id]
            rows.append((prompt_ids + target_ids)[:max_length])
            labels.append(([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_length])
        padded = self.tokenizer.pad({"input_ids": rows}, **pad_kwargs)
        width = len(padded["input_ids"][0])
        left = pad_kwargs.get("padding_side", self.tokenizer.padding_side) == "left"
        padded["labels"] = [
            [IGNORE_INDEX] * (width - len(row)) + row if left else row + [IGNORE_INDEX] * (width - len(row))
            for row in labels
        ]
        return dict(padded)

    def _check_placeholders(self, input_ids: list[list[int]], has_image: list[bool], text_kwargs: dict) -> None:
        """Raise when truncation cut into a row's image placeholders (the model would reject the batch)."""
        for index, (ids, image) in enumerate(zip(input_ids, has_image)):
            found = sum(int(token == self.image_token_id) for token in ids)
            if found != (self.num_image_tokens if image else 0):
                raise ValueError(
                    f"MicroVLMProcessor: truncation to max_length={text_kwargs.get('max_length')} cut text {index}'s "
                    f"image placeholders ({found} of {self.num_image_tokens} left): raise max_length above "
                    f"{self.num_image_tokens} plus the text's length, or pass truncation=False"
                )

    def _replacement_offsets(self, text: str, prompt: str) -> list[dict[str, tuple[int, int]]]:
        """Where the placeholder of `text` went in the expanded text (transformers' `text_replacement_offsets`,
        which keep `return_assistant_tokens_mask` aligned)."""
        width = len(self.image_token)
        if self.image_token not in prompt:
            return []
        start = text.find(self.image_token)
        span = (start, start + width) if start >= 0 else (0, 0)
        begin = max(start, 0)
        return [{"span": span, "new_span": (begin, begin + width * self.num_image_tokens)}]

    @staticmethod
    def _one_image_per_text(images: list, num_texts: int) -> list:
        if len(images) != num_texts:
            raise ValueError(
                f"MicroVLMProcessor: got {len(images)} images for {num_texts} texts; give one image per text"
            )
        flat = []
        for index, item in enumerate(images):
            if isinstance(item, (list, tuple)):
                if len(item) > 1:
                    raise ValueError(f"MicroVLMProcessor: text {index} has {len(item)} images; one image per text")
                item = item[0] if item else None
            flat.append(item)
        return flat

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    @classmethod
    def from_preset(cls, name: str) -> "MicroVLMProcessor":
        """The processor of a preset, from its `processor` section (`MicroVLMConfig.read_preset`): "tiny" works
        offline (its tokenizer ships in `microvlm/assets/`); "microvlm-v" loads Qwen2.5's tokenizer from the Hub
        and uses its `<|image_pad|>` token (no embedding resize). A section's `added_tokens` are added to the
        tokenizer in order (the "ember-*" presets: GPT-2's tokenizer + 5 tokens, `<image>` = 50257)."""
        config = MicroVLMConfig.from_preset(name)
        settings = MicroVLMConfig.read_preset(name)["processor"]
        local = PACKAGE_DIR / settings["tokenizer"]
        tokenizer = AutoTokenizer.from_pretrained(local if local.is_dir() else settings["tokenizer"])
        # Tokens the preset's vocabulary adds to the tokenizer's (EmberVLM: GPT-2's 50257 + 5 = 50262, <image> first).
        tokenizer.add_tokens(settings.get("added_tokens", []), special_tokens=True)
        image_settings = dict(settings["image_processor"])
        image_processor = get_image_processor_class_from_name(image_settings.pop("image_processor_type"))(
            **image_settings
        )
        crop = (
            image_processor.crop_size["height"] if image_processor.do_center_crop else image_processor.size["height"]
        )
        if crop != config.vision_config.image_size:
            raise ValueError(
                f"preset {name!r}: image processor gives {crop} px, the vision tower expects "
                f"{config.vision_config.image_size}: fix `processor.image_processor` in the preset"
            )
        return cls(
            image_processor,
            tokenizer,
            image_token=settings["image_token"],
            num_image_tokens=config.num_image_tokens,
            chat_template=tokenizer.chat_template,
        )


@dataclass
class MicroVLMDataCollator:
    """Rows → labelled training batches (`input_ids`, `attention_mask`, `labels`, `pixel_values`) for the HF
    `Trainer` or TRL's `SFTTrainer(data_collator=...)`, in TRL's dataset formats:

    * prompt–completion: `{"image": img, "prompt": str, "completion": str}` (image optional): labels on the
      completion and the EOS after it;
    * conversational: `{"images": [img], "messages": [...]}`: the last message is the assistant's answer and the
      target, the turns before it (rendered with the chat template, generation prompt added) the prompt.

    Image placeholders, the prompt and padding never carry labels. `max_length` truncates (never inside the
    image placeholders: that raises).
    """

    processor: MicroVLMProcessor
    max_length: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> BatchFeature:
        prompts, targets, images = [], [], []
        for index, row in enumerate(rows):
            row_images = row.get("images") or ([row["image"]] if row.get("image") is not None else [])
            if "messages" in row:
                *context, answer = row["messages"]
                if answer["role"] != "assistant":
                    raise ValueError(f"MicroVLMDataCollator: row {index}'s last message must be the assistant's")
                prompts.append(self.processor.apply_chat_template(context, add_generation_prompt=True))
                content = answer["content"]
                targets.append(content if isinstance(content, str) else "".join(i["text"] for i in content))
            elif "prompt" in row and "completion" in row:
                prompts.append(row["prompt"])
                targets.append(row["completion"])
            else:
                raise ValueError(
                    f"MicroVLMDataCollator: row {index} has columns {sorted(row)}; expected 'messages' or 'prompt' "
                    "and 'completion' (rename yours with datasets' rename_columns)"
                )
            images.append(row_images)
        truncation = {"truncation": True, "max_length": self.max_length} if self.max_length else {}
        has_images = any(images)
        return self.processor(images=images if has_images else None, text=prompts, suffix=targets, **truncation)


__all__ = ["MicroVLMDataCollator", "MicroVLMProcessor"]
