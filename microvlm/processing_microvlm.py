"""MicroVLMProcessor: images → `pixel_values` (DeiT-style resize / crop / normalise), texts → `input_ids` with
each image placeholder expanded to the model's `num_image_tokens` (LLaVA's convention)."""

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin

from .configuration_microvlm import MicroVLMConfig

logger = logging.getLogger(__name__)

# Tokenizers of the presets: the tiny one ships with the package, the others come from the Hub.
PRESET_TOKENIZERS = {"microvlm-v": "Qwen/Qwen2.5-0.5B"}
TINY_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"
IMAGE_PROCESSORS_DIR = Path(__file__).parent / "assets" / "image_processors"  # DeiT-style settings per preset
# Qwen2.5's tokenizer already has a vision placeholder token: reusing it means no embedding resize.
QWEN_IMAGE_TOKEN = "<|image_pad|>"


def to_rgb_image(image: Any, index: int = 0) -> Image.Image:
    """A PIL RGB image from a PIL image of any mode, an (H, W[, 1|3|4]) array (uint8, or float in [0, 1]) or a
    file path; transparency is composited on white. Raises ValueError naming image `index` and the problem."""
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
            f"image {index}: expected a PIL.Image, a numpy array or a file path, got {type(image).__name__}"
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

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def __call__(
        self, images=None, text=None, return_tensors: str | None = "pt", padding: bool | str = True, **kwargs
    ) -> BatchFeature:
        """Tokenise texts and preprocess their images (one image per text at most).

        `images`: one image, a list with one image per text, or a list with one list per text holding zero or one
        image (the nested form chat templates produce). `text`: a string or a list. A text with a placeholder gets
        it expanded to `num_image_tokens`; a text without one, given an image, gets them in front.
        """
        if images is None and text is None:
            raise ValueError("MicroVLMProcessor: give images, text, or both")
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
            data.update(self.image_processor(present, return_tensors=return_tensors))
        expanded = [t.replace(self.image_token, self.image_token * self.num_image_tokens) for t in prompts]
        data.update(self.tokenizer(expanded, return_tensors=return_tensors, padding=padding, **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

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
        """The processor of a preset: "tiny" works offline (shipped tokenizer); "microvlm-v" loads Qwen2.5's
        tokenizer from the Hub and uses its `<|image_pad|>` token."""
        config = MicroVLMConfig.from_preset(name)
        if name == "tiny":
            tokenizer, image_token = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR), "<image>"
        elif name in PRESET_TOKENIZERS:
            tokenizer, image_token = AutoTokenizer.from_pretrained(PRESET_TOKENIZERS[name]), QWEN_IMAGE_TOKEN
        else:
            raise ValueError(f"MicroVLMProcessor.from_preset: no tokenizer known for preset {name!r}")
        image_processor = AutoImageProcessor.from_pretrained(IMAGE_PROCESSORS_DIR / name)
        crop = (
            image_processor.crop_size["height"] if image_processor.do_center_crop else image_processor.size["height"]
        )
        if crop != config.vision_config.image_size:
            raise ValueError(
                f"preset {name!r}: image processor gives {crop} px, the vision tower expects {config.vision_config.image_size}"
            )
        return cls(
            image_processor,
            tokenizer,
            image_token=image_token,
            num_image_tokens=config.num_image_tokens,
            chat_template=tokenizer.chat_template,
        )


__all__ = ["MicroVLMProcessor"]
