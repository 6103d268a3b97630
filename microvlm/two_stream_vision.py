"""A two-stream convolutional vision tower: one stream sees the RGB pixels, the other a hue-free contrast map.

Why: a convolutional tower trained from scratch on colour–shape data entangles the two (its shape features are
colour-specific, as in CLEVR-CoGenT), so it cannot name the shape of a colour–shape pair it never saw. The
contrast stream is blind to hue by construction: it sees, for every pixel, how far the pixel's colour is from
the image's median colour (its background, for objects on a plain or textured ground), scaled so that the
farthest pixel is 1. A red triangle and a green triangle give it the same map, so the shape, count and position
features it learns are the same for every colour. The RGB stream is left to tell the colours apart, and can see
the image shrunk into block means (`rgb_pool_factor`), too coarse to learn colour-specific shapes from.

    pixels (B, 3, H, W) ─┬─► coarse_view (B, 3, H/f, W/f) ─► rgb stream ─► (B, C_rgb, h, w) ─┐
                         └─► contrast_map (B, 1, H, W) ─► contrast stream ─► (B, C_c, h, w) ─┴─► (B, C_rgb + C_c, h, w)

Both streams are any convolutional `AutoModel` (e.g. transformers' ResNet) returning `last_hidden_state` maps of
the same spatial size; the contrast stream's config must take one input channel.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention


def _stream_config(value: "dict | PretrainedConfig | None", field: str) -> PretrainedConfig:
    """A stream's config from a dict with `model_type` (default "resnet") or a config object."""
    if isinstance(value, PretrainedConfig):
        return value
    if not isinstance(value, dict | None):
        raise TypeError(f"TwoStreamVisionConfig.{field} must be a dict or a PretrainedConfig, got {type(value)}")
    value = dict(value or {})
    return AutoConfig.for_model(value.pop("model_type", "resnet"), **value)


def coarse_view(pixel_values: torch.Tensor, factor: int) -> torch.Tensor:
    """Images (B, C, H, W) → (B, C, H / factor, W / factor), the means of `factor` × `factor` blocks: the colours and
    where they are, but no detail finer than a block. `factor` 1 returns the input."""
    return pixel_values if factor == 1 else nn.functional.avg_pool2d(pixel_values, factor)


def contrast_map(pixel_values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The hue-free contrast map of images (B, C, H, W): per pixel, the Euclidean distance of its C values from
    the image's background colour, divided by the image's largest such distance. Returns (B, 1, H, W) in [0, 1].

    The background colour is the per-channel median of a grid of about 16 × 16 pixels (every `H // 16`-th row and
    column): as good as the median of all pixels for objects on a ground that covers most of the image, at a
    fraction of the cost. Objects of any colour come out as the same bright silhouette on a dark ground; a flat
    image gives all zeros.
    """
    step = max(1, pixel_values.shape[-2] // 16), max(1, pixel_values.shape[-1] // 16)
    grid = pixel_values[..., :: step[0], :: step[1]]
    background = grid.flatten(2).median(dim=-1).values[..., None, None]  # (B, C, 1, 1)
    distance = (pixel_values - background).norm(dim=1, keepdim=True)  # (B, 1, H, W)
    return distance / distance.flatten(1).amax(dim=1).clamp_min(eps)[:, None, None, None]


class TwoStreamVisionConfig(PretrainedConfig):
    r"""
    Configuration of [`TwoStreamVisionModel`].

    Args:
        rgb_config (`dict` or `PretrainedConfig`): the stream that sees the RGB pixels (any convolutional
            `AutoConfig` model type; a dict without `model_type` is a ResNet).
        contrast_config (`dict` or `PretrainedConfig`): the stream that sees the contrast map; must have
            `num_channels=1`.
        image_size (`int`): side of the square input images in pixels.
        rgb_pool_factor (`int`): the RGB stream sees the image shrunk by this factor, each pixel the mean of a
            block (`coarse_view`): enough to tell the colours and where they are, too coarse to learn shapes from,
            so that shape is left to the contrast stream and cannot be learned as colour-specific appearances (and
            the RGB stream costs little). 1: the full-resolution image. Must divide `image_size`; the RGB stream's
            config must downsample that much less for the two maps to match.
    """

    model_type = "microvlm_two_stream"
    sub_configs = {"rgb_config": AutoConfig, "contrast_config": AutoConfig}

    def __init__(
        self,
        rgb_config: "dict | PretrainedConfig | None" = None,
        contrast_config: "dict | PretrainedConfig | None" = None,
        image_size: int = 64,
        rgb_pool_factor: int = 1,
        **kwargs,
    ):
        self.rgb_config = _stream_config(rgb_config, "rgb_config")
        self.contrast_config = _stream_config(contrast_config or {"num_channels": 1}, "contrast_config")
        self.image_size = image_size
        self.rgb_pool_factor = rgb_pool_factor
        super().__init__(**kwargs)
        if rgb_pool_factor < 1 or image_size % rgb_pool_factor:
            raise ValueError(
                f"TwoStreamVisionConfig.rgb_pool_factor must be a positive divisor of image_size={image_size}, "
                f"got {rgb_pool_factor}"
            )
        if getattr(self.contrast_config, "num_channels", 1) != 1:
            raise ValueError(
                "TwoStreamVisionConfig.contrast_config.num_channels must be 1 (the contrast map has one channel), "
                f"got {self.contrast_config.num_channels}"
            )

    @property
    def hidden_sizes(self) -> list[int]:
        """[C_rgb + C_contrast]: the width of the concatenated output map (what `MicroVLMConfig` reads)."""
        return [self.rgb_config.hidden_sizes[-1] + self.contrast_config.hidden_sizes[-1]]


class TwoStreamVisionModel(PreTrainedModel):
    """RGB stream and contrast-map stream side by side; their last feature maps concatenated along channels."""

    config_class = TwoStreamVisionConfig
    config: TwoStreamVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    base_model_prefix = "two_stream"

    def __init__(self, config: TwoStreamVisionConfig):
        super().__init__(config)
        self.rgb = AutoModel.from_config(config.rgb_config)
        self.contrast = AutoModel.from_config(config.contrast_config)
        self.rgb_dropped = False
        self.post_init()  # each stream, a PreTrainedModel, keeps its own family's initialisation

    @contextmanager
    def without_rgb(self) -> Iterator[None]:
        """Within the block the RGB stream's map is zeros: the tower passes on shape, count and position (the
        contrast stream) but no colour. Training uses it to ask for predictions that do not depend on colour
        (`microvlm.train.colour_free`)."""
        self.rgb_dropped = True
        try:
            yield
        finally:
            self.rgb_dropped = False

    @property
    def streams(self) -> tuple[PreTrainedModel, PreTrainedModel]:
        """The two towers (RGB, contrast), for code that walks a tower's blocks (e.g. `--trainable_vision_layers`)."""
        return self.rgb, self.contrast

    def forward(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPoolingAndNoAttention:
        """pixel_values (B, 3, H, W) → `last_hidden_state` (B, C_rgb + C_contrast, h, w), `pooler_output` its
        spatial mean (B, C_rgb + C_contrast). Inside `without_rgb()` the first C_rgb channels are zeros."""
        rgb = self.rgb(pixel_values=coarse_view(pixel_values, self.config.rgb_pool_factor)).last_hidden_state
        contrast = self.contrast(pixel_values=contrast_map(pixel_values)).last_hidden_state
        if rgb.shape[2:] != contrast.shape[2:]:
            raise ValueError(
                f"TwoStreamVisionModel: the RGB stream's map is {tuple(rgb.shape[2:])} but the contrast stream's is "
                f"{tuple(contrast.shape[2:])}; make the streams downsample their inputs (the RGB stream's shrunk by "
                "rgb_pool_factor) to the same size."
            )
        if self.rgb_dropped:
            rgb = torch.zeros_like(rgb)
        features = torch.cat([rgb, contrast], dim=1)
        pooled = features.mean((2, 3))
        return BaseModelOutputWithPoolingAndNoAttention(last_hidden_state=features, pooler_output=pooled)
