"""RepViT (Wang et al., "RepViT: Revisiting Mobile CNN From ViT Perspective", CVPR 2024) as a transformers vision
tower: [`RepViTConfig`] (`model_type = "repvit"`) and [`RepViTModel`], which maps pixels (B, 3, H, W) to a feature
map (B, C, H', W') like transformers' ResNet, so that MicroVLM turns it into H'·W' patch tokens.

RepViT is a MobileNetV3-style network restructured like a ViT: every block separates a *token mixer* (a 3×3
depthwise convolution that is re-parameterisable: in training it is BN(BN(dw3×3(x)) + dw1×1(x) + x), three branches
that fold into one 3×3 convolution for inference) from a *channel mixer* (a residual 1×1 → GELU → 1×1 MLP), with a
squeeze-and-excitation on every other block. The layout (stem of two stride-2 3×3 convolutions, stages joined by
downsample blocks, SE on blocks 0, 2, 4, … of each stage) and the module tree follow timm's `repvit.py`, so that
[`repvit_state_dict_from_timm`] maps a timm checkpoint onto this model key for key.

`configuration_microvlm.py` registers the config and model with `AutoConfig`/`AutoModel` (importing `microvlm`, or
a saved folder's remote code, does), so that `AutoConfig.for_model("repvit")` and
`AutoModel.from_config(RepViTConfig(...))` build the tower, and a MicroVLM `vision_config` with
`"model_type": "repvit"` resolves to the copy of this module saved beside it.
"""

import re
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention


class RepViTConfig(PretrainedConfig):
    r"""
    Configuration of a [`RepViTModel`]. The defaults build RepViT-M0.9 (timm's `repvit_m0_9`).

    Args:
        num_channels (`int`): channels of the input images.
        image_size (`int`): side of the square images MicroVLM gives the tower; the output map is
            `image_size // patch_size` positions a side (7 at 224 px with four stages), so it must be a multiple of
            `patch_size`. The tower itself is fully convolutional and runs at any size (sides round up).
        hidden_sizes (`list[int]`): width of each stage (M0.9: 48, 96, 192, 384). The stem ends at
            `hidden_sizes[0]` (through `hidden_sizes[0] // 2`); the model returns the last stage's map, whose
            width `hidden_sizes[-1]` is what MicroVLM reads as the vision width. To read an earlier, finer map
            (14×14×192 at 224 px for M0.9), list only the stages up to it.
        depths (`list[int]`): RepViT blocks per stage (M0.9: 2, 2, 14, 2), after the stage's downsample block
            (every stage but the first opens with one, which halves the map and widens it to the stage's width).
        mlp_ratio (`int`): the channel mixer's hidden width as a multiple of its input width.
        kernel_size (`int`): odd kernel side of the depthwise token mixers and downsampling convolutions.
        se_ratio (`float`): squeeze-and-excitation reduction: blocks 0, 2, 4, … of each stage squeeze C channels
            to `max(8, round(C · se_ratio / 8) · 8)` (timm's `make_divisible`); 0 turns SE off.
        hidden_act (`str`): activation of the stem and the channel mixers (RepViT: GELU).
        batch_norm_eps (`float`): epsilon of every batch norm.
    """

    model_type = "repvit"

    def __init__(
        self,
        num_channels: int = 3,
        image_size: int = 224,
        hidden_sizes: Sequence[int] = (48, 96, 192, 384),
        depths: Sequence[int] = (2, 2, 14, 2),
        mlp_ratio: int = 2,
        kernel_size: int = 3,
        se_ratio: float = 0.25,
        hidden_act: str = "gelu",
        batch_norm_eps: float = 1e-5,
        **kwargs,
    ):
        self.num_channels = num_channels
        self.image_size = image_size
        self.hidden_sizes = list(hidden_sizes)
        self.depths = list(depths)
        self.mlp_ratio = mlp_ratio
        self.kernel_size = kernel_size
        self.se_ratio = se_ratio
        self.hidden_act = hidden_act
        self.batch_norm_eps = batch_norm_eps
        if "patch_size" in kwargs:
            raise ValueError(
                "RepViTConfig.patch_size is not a setting: it is the tower's stride, 4 · 2^(len(hidden_sizes) - 1). "
                "Change hidden_sizes and depths to change it."
            )
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        positive = {"num_channels": self.num_channels, "image_size": self.image_size, "mlp_ratio": self.mlp_ratio}
        for field, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"RepViTConfig.{field} must be a positive integer, got {value!r}")
        if not self.hidden_sizes or any(not isinstance(w, int) or w <= 0 for w in self.hidden_sizes):
            raise ValueError(
                f"RepViTConfig.hidden_sizes must be a non-empty list of positive stage widths, got {self.hidden_sizes}"
            )
        if self.hidden_sizes[0] % 2:
            raise ValueError(
                f"RepViTConfig.hidden_sizes[0]={self.hidden_sizes[0]} must be even: the stem's first convolution "
                "outputs half of it"
            )
        if len(self.depths) != len(self.hidden_sizes) or any(not isinstance(d, int) or d < 0 for d in self.depths):
            raise ValueError(
                f"RepViTConfig.depths must give a block count >= 0 for each of the {len(self.hidden_sizes)} stages "
                f"of hidden_sizes, got {self.depths}"
            )
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(
                f"RepViTConfig.kernel_size must be an odd positive integer (same-size depthwise convolutions), "
                f"got {self.kernel_size!r}"
            )
        if not 0 <= self.se_ratio <= 1:
            raise ValueError(f"RepViTConfig.se_ratio must be in [0, 1] (0: no SE), got {self.se_ratio}")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"RepViTConfig.hidden_act={self.hidden_act!r} is not one of transformers' ACT2FN names")
        if self.batch_norm_eps <= 0:
            raise ValueError(f"RepViTConfig.batch_norm_eps must be > 0, got {self.batch_norm_eps}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"RepViTConfig.image_size={self.image_size} must be a multiple of the tower's stride "
                f"{self.patch_size} ({len(self.hidden_sizes)} stages), so that the map has image_size // stride "
                "positions a side, the patch count MicroVLMConfig derives"
            )

    @property
    def patch_size(self) -> int:
        """Pixels per side of one position of the output map, the tower's stride: 4 (stem) · 2 per later stage.

        MicroVLMConfig derives its patch count from it, `(image_size // patch_size) ** 2` (49 at 224 px)."""
        return 4 * 2 ** (len(self.hidden_sizes) - 1)


def squeeze_channels(channels: int, ratio: float, divisor: int = 8) -> int:
    """SE bottleneck width: `channels · ratio` rounded to a multiple of `divisor`, at least `divisor` (timm's
    `make_divisible(v, 8, round_limit=0)`)."""
    return max(divisor, int(channels * ratio + divisor / 2) // divisor * divisor)


class RepViTConvNorm(nn.Module):
    """Convolution without bias → BatchNorm: (B, C_in, H, W) → (B, C_out, H / stride, W / stride).

    `initial_scale` is the batch norm's initial scale γ: 0 makes the residual branch this layer ends start silent."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        eps: float = 1e-5,
        initial_scale: float = 1.0,
    ):
        super().__init__()
        self.convolution = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False
        )
        self.normalization = nn.BatchNorm2d(out_channels, eps=eps)
        self.normalization.initial_scale = initial_scale  # read by `RepViTPreTrainedModel._init_weights`

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.normalization(self.convolution(hidden_states))


class RepViTEmbeddings(nn.Module):
    """The stem: 3×3 stride-2 conv-BN → activation → 3×3 stride-2 conv-BN, (B, 3, H, W) → (B, C0, H/4, W/4)."""

    def __init__(self, config: RepViTConfig):
        super().__init__()
        width, eps = config.hidden_sizes[0], config.batch_norm_eps
        self.convolution1 = RepViTConvNorm(config.num_channels, width // 2, 3, stride=2, eps=eps)
        self.activation = ACT2FN[config.hidden_act]
        self.convolution2 = RepViTConvNorm(width // 2, width, 3, stride=2, eps=eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.convolution2(self.activation(self.convolution1(pixel_values)))


class RepViTTokenMixer(nn.Module):
    """Re-parameterisable depthwise mixing: BN(BN(dw k×k(x)) + dw 1×1(x) + x), (B, C, H, W) → (B, C, H, W).

    The three branches are linear in x, so for inference they fold into one k×k depthwise convolution with bias
    (RepVGG's structural re-parameterisation); this module keeps the training form."""

    def __init__(self, channels: int, config: RepViTConfig):
        super().__init__()
        self.depthwise = RepViTConvNorm(
            channels, channels, config.kernel_size, groups=channels, eps=config.batch_norm_eps
        )
        self.pointwise = nn.Conv2d(channels, channels, 1, groups=channels)
        self.normalization = nn.BatchNorm2d(channels, eps=config.batch_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.normalization(self.depthwise(hidden_states) + self.pointwise(hidden_states) + hidden_states)


class RepViTSqueezeExcitation(nn.Module):
    """x · sigmoid(W2 ReLU(W1 mean_HW(x) + b1) + b2), W1: C → r, W2: r → C (1×1 convolutions with bias)."""

    def __init__(self, channels: int, config: RepViTConfig):
        super().__init__()
        squeezed = squeeze_channels(channels, config.se_ratio)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.activation = nn.ReLU()
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        scale = self.expand(self.activation(self.reduce(hidden_states.mean((2, 3), keepdim=True))))
        return hidden_states * scale.sigmoid()


class RepViTChannelMixer(nn.Module):
    """1×1 conv-BN (C → mlp_ratio·C) → activation → 1×1 conv-BN (→ C), the projection's BN starting at zero scale
    so that the residual branch it ends starts silent. (B, C, H, W) → (B, C, H, W), without the residual."""

    def __init__(self, channels: int, config: RepViTConfig):
        super().__init__()
        hidden, eps = channels * config.mlp_ratio, config.batch_norm_eps
        self.expand = RepViTConvNorm(channels, hidden, eps=eps)
        self.activation = ACT2FN[config.hidden_act]
        self.project = RepViTConvNorm(hidden, channels, eps=eps, initial_scale=0.0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.project(self.activation(self.expand(hidden_states)))


class RepViTBlock(nn.Module):
    """y = token_mixer(x) [→ SE]; out = y + channel_mixer(y). (B, C, H, W) → (B, C, H, W).

    The token mixer carries its own identity branch, so the block has no outer residual around it."""

    def __init__(self, channels: int, config: RepViTConfig, use_se: bool):
        super().__init__()
        self.token_mixer = RepViTTokenMixer(channels, config)
        self.squeeze_excitation = RepViTSqueezeExcitation(channels, config) if use_se else None
        self.channel_mixer = RepViTChannelMixer(channels, config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.token_mixer(hidden_states)
        if self.squeeze_excitation is not None:
            hidden_states = self.squeeze_excitation(hidden_states)
        return hidden_states + self.channel_mixer(hidden_states)


class RepViTDownsample(nn.Module):
    """Between stages: a RepViT block (no SE) at the old width → k×k depthwise stride-2 conv-BN → 1×1 conv-BN to
    the new width → residual channel mixer. (B, C_in, H, W) → (B, C_out, ceil(H/2), ceil(W/2))."""

    def __init__(self, in_channels: int, out_channels: int, config: RepViTConfig):
        super().__init__()
        eps = config.batch_norm_eps
        self.pre_block = RepViTBlock(in_channels, config, use_se=False)
        self.spatial = RepViTConvNorm(
            in_channels, in_channels, config.kernel_size, stride=2, groups=in_channels, eps=eps
        )
        self.channel = RepViTConvNorm(in_channels, out_channels, eps=eps)
        self.channel_mixer = RepViTChannelMixer(out_channels, config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.channel(self.spatial(self.pre_block(hidden_states)))
        return hidden_states + self.channel_mixer(hidden_states)


class RepViTStage(nn.Module):
    """[downsample (every stage but the first) →] `depth` RepViT blocks, SE on blocks 0, 2, 4, …"""

    def __init__(self, in_channels: int, out_channels: int, depth: int, config: RepViTConfig, downsample: bool):
        super().__init__()
        self.downsample = RepViTDownsample(in_channels, out_channels, config) if downsample else None
        use_se = config.se_ratio > 0
        self.layers = nn.ModuleList(
            RepViTBlock(out_channels, config, use_se=use_se and index % 2 == 0) for index in range(depth)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            hidden_states = self.downsample(hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class RepViTEncoder(nn.Module):
    """The stages in order, (B, C0, H/4, W/4) → (B, C_last, H/s, W/s) with s = `config.patch_size`."""

    def __init__(self, config: RepViTConfig):
        super().__init__()
        widths = [config.hidden_sizes[0], *config.hidden_sizes]
        self.stages = nn.ModuleList(
            RepViTStage(widths[index], widths[index + 1], depth, config, downsample=index > 0)
            for index, depth in enumerate(config.depths)
        )

    def forward(
        self, hidden_states: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The last stage's map and, with `output_hidden_states`, every stage's map (else an empty tuple)."""
        all_hidden_states = ()
        for stage in self.stages:
            hidden_states = stage(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        return hidden_states, all_hidden_states


class RepViTPreTrainedModel(PreTrainedModel):
    config_class = RepViTConfig
    config: RepViTConfig
    base_model_prefix = "repvit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["RepViTStage"]

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default convolution init (what timm's RepViT trains from); batch norms at scale 1, shift 0 and
        fresh statistics, except the channel mixers' last one at scale 0 (each residual block starts as the
        identity)."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                init.uniform_(module.bias, -(fan_in**-0.5), fan_in**-0.5)
        elif isinstance(module, nn.BatchNorm2d):
            init.constant_(module.weight, getattr(module, "initial_scale", 1.0))
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


class RepViTModel(RepViTPreTrainedModel):
    """RepViT feature extractor without classifier: pixels (B, C_in, H, W) → `last_hidden_state`
    (B, hidden_sizes[-1], H', W') with H' = ceil(H / patch_size), and `pooler_output` (B, hidden_sizes[-1]), its
    spatial mean."""

    def __init__(self, config: RepViTConfig):
        super().__init__(config)
        self.embeddings = RepViTEmbeddings(config)
        self.encoder = RepViTEncoder(config)  # `encoder.stages`, where ResNet keeps its stages too
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        """pixel_values (B, C_in, H, W) → last_hidden_state (B, C, H', W'), pooler_output (B, C) and, with
        `output_hidden_states`, the stem's map and every stage's map."""
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        embedded = self.embeddings(pixel_values)
        hidden_states, stage_maps = self.encoder(embedded, output_hidden_states)
        all_hidden_states = (embedded, *stage_maps) if output_hidden_states else None
        pooled = hidden_states.mean((2, 3))
        if not return_dict:
            return tuple(v for v in (hidden_states, pooled, all_hidden_states) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=hidden_states, pooler_output=pooled, hidden_states=all_hidden_states
        )


# timm `repvit.py` name → RepViTModel name, applied in order to each key (the classifier `head.*` is dropped).
TIMM_KEY_RENAMES = (
    (r"^stem\.conv(\d)\.", r"embeddings.convolution\1."),
    (r"^stages\.", "encoder.stages."),
    (r"\.blocks\.", ".layers."),
    (r"\.spatial_downsample\.", ".spatial."),
    (r"\.channel_downsample\.", ".channel."),
    (r"\.ffn\.", ".channel_mixer."),
    (r"\.token_mixer\.conv1\.", ".token_mixer.pointwise."),
    (r"\.token_mixer\.conv\.", ".token_mixer.depthwise."),
    (r"\.token_mixer\.bn\.", ".token_mixer.normalization."),
    (r"\.se\.fc1\.", ".squeeze_excitation.reduce."),
    (r"\.se\.fc2\.", ".squeeze_excitation.expand."),
    (r"\.channel_mixer\.conv1\.", ".channel_mixer.expand."),
    (r"\.channel_mixer\.conv2\.", ".channel_mixer.project."),
    (r"\.c\.weight$", ".convolution.weight"),
    (r"\.bn\.", ".normalization."),
)


def repvit_state_dict_from_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm RepViT state dict (`timm.create_model("repvit_m0_9.dist_450e_in1k").state_dict()`) to
    [`RepViTModel`]'s names; the classification heads (`head.*`) are dropped. Tensors are not copied.

    Only timm's current RepViT layout maps (M0.9, M1.0, M1.1, M1.5, M2.3): the "legacy" M1/M2/M3 checkpoints put a
    BN on the token mixer's 1×1 branch instead of after the sum, which this model does not build."""
    if any(".token_mixer.conv1.c." in key for key in state_dict):
        raise ValueError(
            "repvit_state_dict_from_timm: this is a legacy timm RepViT checkpoint (repvit_m1/m2/m3: "
            "`token_mixer.conv1.c.weight`), whose token mixer differs from RepViTModel's; use a repvit_m0_9, m1_0, "
            "m1_1, m1_5 or m2_3 checkpoint."
        )
    renamed = {}
    for key, tensor in state_dict.items():
        if key.startswith("head."):
            continue
        for pattern, replacement in TIMM_KEY_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor
    return renamed


__all__ = ["RepViTConfig", "RepViTModel", "RepViTPreTrainedModel", "repvit_state_dict_from_timm"]
