"""A two-stream convolutional vision tower: one stream sees the RGB pixels, the other a hue-free contrast map.

Why: a convolutional tower trained from scratch on colour–shape data entangles the two (its shape features are
colour-specific, as in CLEVR-CoGenT), so it cannot name the shape of a colour–shape pair it never saw. The
contrast stream is blind to hue by construction: it sees, for every pixel, how far the pixel's colour is from
the image's median colour (its background, for objects on a plain or textured ground), scaled so that the
farthest pixel is 1. A red triangle and a green triangle give it the same map, so the shape, count and position
features it learns are the same for every colour, and the RGB stream is left to tell the colours apart.

    pixels (B, 3, H, W) ─┬─► rgb stream ────────────────────────────► (B, C_rgb, h, w) ─┐
                         └─► contrast_map (B, 1, H, W) ─► contrast stream ─► (B, C_c, h, w) ─┴─► (B, C_rgb + C_c, h, w)

Both streams are any convolutional `AutoModel` (e.g. transformers' ResNet) returning `last_hidden_state` maps of
the same spatial size; the contrast stream's config must take one input channel.
"""

import torch
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


def contrast_map(pixel_values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The hue-free contrast map of images (B, C, H, W): per pixel, the Euclidean distance of its C values from
    the image's per-channel median, divided by the image's largest such distance. Returns (B, 1, H, W) in [0, 1].

    Objects of any colour on a background that covers most of the image come out as the same bright silhouette
    on a dark ground; a flat image gives all zeros.
    """
    median = pixel_values.flatten(2).median(dim=-1).values[..., None, None]  # (B, C, 1, 1)
    distance = (pixel_values - median).norm(dim=1, keepdim=True)  # (B, 1, H, W)
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
    """

    model_type = "microvlm_two_stream"
    sub_configs = {"rgb_config": AutoConfig, "contrast_config": AutoConfig}

    def __init__(
        self,
        rgb_config: "dict | PretrainedConfig | None" = None,
        contrast_config: "dict | PretrainedConfig | None" = None,
        image_size: int = 64,
        **kwargs,
    ):
        self.rgb_config = _stream_config(rgb_config, "rgb_config")
        self.contrast_config = _stream_config(contrast_config or {"num_channels": 1}, "contrast_config")
        self.image_size = image_size
        super().__init__(**kwargs)
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
        self.post_init()  # each stream, a PreTrainedModel, keeps its own family's initialisation

    def forward(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPoolingAndNoAttention:
        """pixel_values (B, 3, H, W) → `last_hidden_state` (B, C_rgb + C_contrast, h, w), `pooler_output` its
        spatial mean (B, C_rgb + C_contrast)."""
        rgb = self.rgb(pixel_values=pixel_values).last_hidden_state
        contrast = self.contrast(pixel_values=contrast_map(pixel_values)).last_hidden_state
        if rgb.shape[2:] != contrast.shape[2:]:
            raise ValueError(
                f"TwoStreamVisionModel: the RGB stream's map is {tuple(rgb.shape[2:])} but the contrast stream's is "
                f"{tuple(contrast.shape[2:])}; give both streams the same number of downsampling stages."
            )
        features = torch.cat([rgb, contrast], dim=1)
        pooled = features.mean((2, 3))
        return BaseModelOutputWithPoolingAndNoAttention(last_hidden_state=features, pooler_output=pooled)
