"""Configuration of MicroVLM: a vision tower, a vision→language adapter, a causal language model,
a CLIP-style alignment head and (optionally) a Larimar episodic memory.

Every size lives here (or in a preset JSON under `presets/`), never in the modelling code: the tiny test
model and the reference "microvlm-v" model are the same code with another config.
"""

import json
import math
from pathlib import Path
from typing import Any

from transformers import CONFIG_MAPPING, AutoConfig, AutoModel, PretrainedConfig

from .repvit import RepViTConfig, RepViTModel
from .two_stream_vision import TwoStreamVisionConfig, TwoStreamVisionModel


PRESETS_DIR = Path(__file__).parent / "presets"
AUTO_MAP = {
    "AutoConfig": "configuration_microvlm.MicroVLMConfig",
    "AutoModel": "modeling_microvlm.MicroVLMModel",
    "AutoModelForCausalLM": "modeling_microvlm.MicroVLMForCausalLM",
    "AutoModelForImageTextToText": "modeling_microvlm.MicroVLMForCausalLM",
}
ALIGNMENT_IMAGE_SOURCES = ("cls", "prefix")
# The package's own vision towers, whose code ships beside this module. A saved folder resolves their model types
# to its own copies (SHIPPED_CONFIGS; so it works where the `microvlm` package is not installed, whatever another
# copy registered with AutoConfig), and AutoModel maps each copy's config class to that copy's model. The first
# copy imported keeps the name in AutoConfig: loading a folder's remote code in-process does not take it over.
SHIPPED_TOWERS = {RepViTConfig: RepViTModel, TwoStreamVisionConfig: TwoStreamVisionModel}
SHIPPED_CONFIGS = {config.model_type: config for config in SHIPPED_TOWERS}
for _config, _model in SHIPPED_TOWERS.items():
    if _config.model_type not in CONFIG_MAPPING:
        AutoConfig.register(_config.model_type, _config)
    AutoModel.register(_config, _model, exist_ok=True)


def _as_sub_config(value: "dict | PretrainedConfig | None", default_model_type: str, field: str) -> PretrainedConfig:
    """Turn a dict (with or without `model_type`) or a config object into a config object, like LLaVA does."""
    if isinstance(value, PretrainedConfig):
        return value
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise TypeError(f"MicroVLMConfig.{field} must be a dict or a PretrainedConfig, got {type(value).__name__}")
    value = dict(value)
    model_type = value.pop("model_type", default_model_type)
    if model_type in SHIPPED_CONFIGS:
        return SHIPPED_CONFIGS[model_type](**value)
    return AutoConfig.for_model(model_type, **value)


class MicroVLMConfig(PretrainedConfig):
    r"""
    Configuration for [`MicroVLMForCausalLM`].

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            Config of the vision tower, any `AutoConfig` model type (default: DeiT). The tower must return
            `last_hidden_state` of shape (batch, tokens, vision_dim) whose last `num_patches` tokens are patches.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Config of the causal language model, any `AutoConfig` model type with an `AutoModelForCausalLM` class
            (default: Qwen2).
        image_token_id (`int`):
            Id of the image placeholder token; the processor expands one placeholder to `num_image_tokens` copies
            and the model overwrites them with the adapter's prefix tokens.
        vision_num_patches (`int`, *optional*):
            Number of patch tokens of the vision tower. Derived from `image_size` and `patch_size` when `None`.
        vision_cls_token (`bool`):
            Whether token 0 of the vision output is a CLS token (ViT/DeiT). Without one (convolutional towers)
            the alignment head uses the mean of the patch tokens.
        vision_tower_kwargs (`dict`, *optional*):
            Extra constructor arguments of the vision tower's `AutoModel` class, e.g. `{"add_pooling_layer": false}`
            for ViT/DeiT, whose pooler MicroVLM never uses.
        patches_per_prefix_token, min_prefix_tokens, max_prefix_tokens (`int`):
            The adapter pools the patches into `clamp(ceil(num_patches / patches_per_prefix_token), min, max)`
            learned queries (25 for DeiT-Tiny's 196 patches).
        adapter_mlp_ratio (`int`): hidden width of the adapter MLP as a multiple of the LM hidden size, unless
            `adapter_mlp_hidden_size` is set.
        adapter_mlp_hidden_size (`int`, *optional*): hidden width of the adapter MLP in units (MicroVLM-M: 512);
            `None`: `adapter_mlp_ratio` × LM hidden size (MicroVLM-V: 1792).
        adapter_dropout (`float`): dropout on the adapter MLP's output (MicroVLM-M: 0.1).
        adapter_num_heads (`int`): heads of the adapter's cross-attention pooling.
        adapter_patch_positions (`bool`):
            Add learned per-patch position embeddings (num_patches, hidden) to the adapter's keys. Convolutional
            towers carry no absolute position and the pooling attention is order-blind, so without them "on the
            left" cannot be told from "on the right"; ViT/DeiT towers have their own and leave this off.
        alignment_image_source (`str`):
            What the alignment head projects: `"cls"`, the vision CLS (the mean of the patch tokens without one),
            or `"prefix"`, the adapter's k prefix tokens flattened (k · hidden), which carry the adapter's positions.
        alignment_temperature (`float`), alignment_learnable_temperature (`bool`):
            Temperature τ of the bidirectional InfoNCE between projected CLS and mean-pooled text embeddings.
        alignment_projection_dim (`int`, *optional*): width of the space InfoNCE compares in (MicroVLM-M: 512):
            image and text embeddings are each projected to it. `None`: the LM hidden size, with the text side
            unprojected (MicroVLM-V, tiny).
        lm_loss_weight, alignment_loss_weight, memory_kl_weight, addressing_kl_weight (`float`):
            Weights of the loss terms: LM + α·InfoNCE + β·memory KL + γ·addressing KL.
        memory_reconstruction_weight (`float`): weight of Larimar's reconstruction term, the mean squared error
            between each written episode step's code and what that code reads back (see
            `LarimarMemory.reconstruction_error`); 0 (default) skips computing it.
        use_memory (`bool`), memory_num_slots (`int`), memory_episode_size (`int`), memory_* :
            Larimar episodic memory settings (see `larimar_memory.py`).
        memory_key_dim (`int`): width of a code's key, the part that addresses (see `memory_encoder.py`); codes
            are `memory_key_dim` + hidden size wide. Must be >= `memory_num_slots` for exact key reads.
        memory_key_kernel_size (`int`): tokens of context the key's convolution sees ("image 1 2" vs "image 1").
        memory_addressing_log_variance_init (`float`): initial log-variance of the training reads' address noise
            (see `LarimarMemory`).
        memory_step_loss_weight (`float`): weight of the addressing loss that teaches a recall question's key to
            find the asked step (needs `memory_target_step` in the batch).
        memory_use_bitnet (`bool`): BitNet b1.58 ternary weights (8-bit activations) for W_M and ScopeNet.
        lm_use_bitnet (`bool`): BitNet b1.58 ternary weights (8-bit activations) for the language model's q, k, v,
            o, gate, up and down projections (quantisation-aware training; embedding and LM head stay).
        weight_formats (`dict`, *optional*): the packed form of an exported model (see `packed_weights.py`),
            written by `python -m microvlm.export`; `None` for a model in training form.
        scope_hidden_size (`int`), scope_threshold (`float`): ScopeNet gate width and inference threshold.
        scope_num_layers (`int`): ScopeNet's hidden layers: 2 gives code→h→h→1 (MicroVLM-V, tiny), 1 the seed's
            MicroVLM-M code→256→1.
        scope_loss_weight (`float`): weight of ScopeNet's BCE against `scope_targets`, when a batch carries them.
        adapter_activation (`str`): activation of the adapter MLP, a transformers `ACT2FN` name (EmberVLM's
            projection: "relu").
        use_reasoning (`bool`): add the EmberVLM reasoning module (`reasoning_head.py`) on the LM's hidden state at
            the last prompt token: iterated reasoning steps, a step validator and an answer head.
        reasoning_hidden_size (`int`): width of the reasoning step MLP D→h→D (seed: 768).
        reasoning_validator_hidden_size (`int`): width of the step validator [current; previous] 2D→h→1 (seed: 384).
        reasoning_answer_hidden_size (`int`): width of the answer head D→h→`reasoning_num_answers` (seed: 192).
        reasoning_num_answers (`int`): classes of the answer head (EmberVLM: 5 robot types).
        reasoning_max_steps (`int`): at most this many reasoning steps (seed: `max_reasoning_steps`).
        reasoning_consistency_threshold (`float`): a row stops reasoning once its step's consistency score reaches
            this (seed: `consistency_threshold`).
        reasoning_dropout (`float`): dropout inside the reasoning module's MLPs.
        reasoning_answer_weight, reasoning_consistency_weight (`float`): weights of the answer cross-entropy and of
            the validator's consistency BCE, when a batch carries `answer_targets`.
        distillation_weight (`float`), distillation_temperature (`float`): weight and temperature τ of the
            distillation term τ²·KL(teacher ‖ student) on the labelled positions, when a batch carries
            `teacher_logits`.
    """

    model_type = "microvlm"
    # The Trainer's predictions are the logits alone: `compute_metrics` gets them, not every output term.
    keys_to_ignore_at_inference = [
        "past_key_values",
        "hidden_states",
        "attentions",
        "lm_loss",
        "alignment_loss",
        "alignment_logits",
        "image_prefix",
        "image_attention",
        "memory_kl",
        "addressing_kl",
        "memory_step_loss",
        "scope_gate",
        "scope_loss",
        "reasoning_steps",
        "reasoning_consistency",
        "reasoning_num_steps",
        "answer_logits",
        "reasoning_answer_loss",
        "reasoning_consistency_loss",
        "distillation_loss",
    ]
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: "dict | PretrainedConfig | None" = None,
        text_config: "dict | PretrainedConfig | None" = None,
        image_token_id: int = 151655,
        vision_num_patches: int | None = None,
        vision_cls_token: bool = True,
        vision_tower_kwargs: dict | None = None,
        patches_per_prefix_token: int = 8,
        min_prefix_tokens: int = 8,
        max_prefix_tokens: int = 64,
        adapter_mlp_ratio: int = 2,
        adapter_mlp_hidden_size: int | None = None,
        adapter_dropout: float = 0.0,
        adapter_num_heads: int = 8,
        adapter_patch_positions: bool = False,
        alignment_image_source: str = "cls",
        alignment_temperature: float = 0.07,
        alignment_learnable_temperature: bool = False,
        alignment_projection_dim: int | None = None,
        lm_loss_weight: float = 1.0,
        alignment_loss_weight: float = 1.0,
        memory_kl_weight: float = 0.02,
        addressing_kl_weight: float = 0.005,
        memory_reconstruction_weight: float = 0.0,
        use_memory: bool = False,
        memory_num_slots: int = 512,
        memory_episode_size: int = 2,
        memory_observation_noise_std: float = 0.1,
        memory_pinv_method: str = "cholesky",
        memory_pinv_steps: int = 15,
        memory_use_lstm: bool = False,
        memory_tokens_per_read: int = 1,
        memory_key_dim: int = 512,
        memory_key_kernel_size: int = 3,
        memory_step_loss_weight: float = 1.0,
        memory_addressing_log_variance_init: float = -9.0,
        memory_use_bitnet: bool = False,
        lm_use_bitnet: bool = False,
        weight_formats: dict | None = None,
        scope_hidden_size: int = 256,
        scope_threshold: float = 0.5,
        scope_loss_weight: float = 0.1,
        scope_num_layers: int = 2,
        adapter_activation: str = "gelu",
        use_reasoning: bool = False,
        reasoning_hidden_size: int = 768,
        reasoning_validator_hidden_size: int = 384,
        reasoning_answer_hidden_size: int = 192,
        reasoning_num_answers: int = 5,
        reasoning_max_steps: int = 4,
        reasoning_consistency_threshold: float = 0.9,
        reasoning_dropout: float = 0.1,
        reasoning_answer_weight: float = 1.0,
        reasoning_consistency_weight: float = 0.5,
        distillation_weight: float = 0.0,
        distillation_temperature: float = 2.0,
        **kwargs: Any,
    ):
        self.vision_config = _as_sub_config(vision_config, "deit", "vision_config")
        self.text_config = _as_sub_config(text_config, "qwen2", "text_config")
        self.image_token_id = image_token_id
        self.vision_num_patches = vision_num_patches
        self.vision_cls_token = vision_cls_token
        self.vision_tower_kwargs = dict(vision_tower_kwargs or {})
        self.patches_per_prefix_token = patches_per_prefix_token
        self.min_prefix_tokens = min_prefix_tokens
        self.max_prefix_tokens = max_prefix_tokens
        self.adapter_mlp_ratio = adapter_mlp_ratio
        self.adapter_mlp_hidden_size = adapter_mlp_hidden_size
        self.adapter_dropout = adapter_dropout
        self.adapter_num_heads = adapter_num_heads
        self.adapter_patch_positions = adapter_patch_positions
        self.alignment_image_source = alignment_image_source
        self.alignment_temperature = alignment_temperature
        self.alignment_learnable_temperature = alignment_learnable_temperature
        self.alignment_projection_dim = alignment_projection_dim
        self.lm_loss_weight = lm_loss_weight
        self.alignment_loss_weight = alignment_loss_weight
        self.memory_kl_weight = memory_kl_weight
        self.addressing_kl_weight = addressing_kl_weight
        self.memory_reconstruction_weight = memory_reconstruction_weight
        self.use_memory = use_memory
        self.memory_num_slots = memory_num_slots
        self.memory_episode_size = memory_episode_size
        self.memory_observation_noise_std = memory_observation_noise_std
        self.memory_pinv_method = memory_pinv_method
        self.memory_pinv_steps = memory_pinv_steps
        self.memory_use_lstm = memory_use_lstm
        self.memory_tokens_per_read = memory_tokens_per_read
        self.memory_key_dim = memory_key_dim
        self.memory_key_kernel_size = memory_key_kernel_size
        self.memory_step_loss_weight = memory_step_loss_weight
        self.memory_addressing_log_variance_init = memory_addressing_log_variance_init
        self.memory_use_bitnet = memory_use_bitnet
        self.lm_use_bitnet = lm_use_bitnet
        self.weight_formats = weight_formats
        self.scope_hidden_size = scope_hidden_size
        self.scope_threshold = scope_threshold
        self.scope_loss_weight = scope_loss_weight
        self.scope_num_layers = scope_num_layers
        self.adapter_activation = adapter_activation
        self.use_reasoning = use_reasoning
        self.reasoning_hidden_size = reasoning_hidden_size
        self.reasoning_validator_hidden_size = reasoning_validator_hidden_size
        self.reasoning_answer_hidden_size = reasoning_answer_hidden_size
        self.reasoning_num_answers = reasoning_num_answers
        self.reasoning_max_steps = reasoning_max_steps
        self.reasoning_consistency_threshold = reasoning_consistency_threshold
        self.reasoning_dropout = reasoning_dropout
        self.reasoning_answer_weight = reasoning_answer_weight
        self.reasoning_consistency_weight = reasoning_consistency_weight
        self.distillation_weight = distillation_weight
        self.distillation_temperature = distillation_temperature
        # Tying is the language model's own business (Qwen2.5-0.5B ties, others may not): mirror its setting so
        # that transformers' loading logic sees the same answer at both levels.
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        # Every Auto class a user may reach for resolves to the remote-code modules saved beside config.json.
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        if self.num_patches <= 0:
            raise ValueError(f"MicroVLMConfig: the vision tower must have patches, got num_patches={self.num_patches}")
        if not 0 < self.min_prefix_tokens <= self.max_prefix_tokens:
            raise ValueError(
                "MicroVLMConfig: expected 0 < min_prefix_tokens <= max_prefix_tokens, got "
                f"{self.min_prefix_tokens} and {self.max_prefix_tokens}"
            )
        if self.text_config.hidden_size % self.adapter_num_heads:
            raise ValueError(
                f"MicroVLMConfig.adapter_num_heads={self.adapter_num_heads} must divide the text hidden size "
                f"{self.text_config.hidden_size}"
            )
        if self.memory_key_dim < self.memory_num_slots:
            raise ValueError(
                f"MicroVLMConfig.memory_key_dim={self.memory_key_dim} must be >= memory_num_slots="
                f"{self.memory_num_slots}: with fewer key dims than slots a read cannot find the address a step was "
                "written at. Raise memory_key_dim or lower memory_num_slots."
            )
        if self.alignment_image_source not in ALIGNMENT_IMAGE_SOURCES:
            raise ValueError(
                f"MicroVLMConfig.alignment_image_source must be one of {ALIGNMENT_IMAGE_SOURCES}, "
                f"got {self.alignment_image_source!r}"
            )
        if self.alignment_temperature <= 0:
            raise ValueError(f"MicroVLMConfig.alignment_temperature must be > 0, got {self.alignment_temperature}")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"MicroVLMConfig.adapter_dropout must be in [0, 1), got {self.adapter_dropout}")
        if self.reasoning_max_steps < 1:
            raise ValueError(f"MicroVLMConfig.reasoning_max_steps must be >= 1, got {self.reasoning_max_steps}")
        if self.distillation_temperature <= 0:
            raise ValueError(
                f"MicroVLMConfig.distillation_temperature must be > 0, got {self.distillation_temperature}"
            )
        if self.scope_num_layers < 1:
            raise ValueError(
                f"MicroVLMConfig.scope_num_layers must be >= 1 (ScopeNet's hidden layers), got {self.scope_num_layers}"
            )

    @property
    def adapter_hidden_size(self) -> int:
        """Hidden width of the adapter MLP: `adapter_mlp_hidden_size`, else `adapter_mlp_ratio` × LM hidden size."""
        return self.adapter_mlp_hidden_size or self.adapter_mlp_ratio * self.text_config.hidden_size

    @property
    def alignment_dim(self) -> int:
        """Width of the space the alignment head compares in: `alignment_projection_dim`, else the LM hidden size."""
        return self.alignment_projection_dim or self.text_config.hidden_size

    @property
    def vision_hidden_size(self) -> int:
        """Width of the vision tower's tokens (`hidden_sizes[-1]` for convolutional towers)."""
        sizes = getattr(self.vision_config, "hidden_sizes", None)
        return sizes[-1] if sizes else self.vision_config.hidden_size

    @property
    def alignment_input_size(self) -> int:
        """Width of the image embedding the alignment head projects: the vision width for `"cls"`, k · hidden for
        `"prefix"`."""
        if self.alignment_image_source == "prefix":
            return self.num_image_tokens * self.text_config.hidden_size
        return self.vision_hidden_size

    @property
    def num_patches(self) -> int:
        """Number of patch tokens the vision tower returns (196 for DeiT-Tiny at 224 px)."""
        if self.vision_num_patches is not None:
            return self.vision_num_patches
        image_size, patch_size = self.vision_config.image_size, self.vision_config.patch_size
        return (image_size // patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """k_prefix = clamp(ceil(num_patches / patches_per_prefix_token), min_prefix_tokens, max_prefix_tokens)."""
        k = math.ceil(self.num_patches / self.patches_per_prefix_token)
        return min(max(k, self.min_prefix_tokens), self.max_prefix_tokens)

    @classmethod
    def preset_names(cls) -> list[str]:
        """Names accepted by [`from_preset`]."""
        return sorted(path.stem for path in PRESETS_DIR.glob("*.json"))

    @classmethod
    def read_preset(cls, name: str) -> dict[str, Any]:
        """The values of `microvlm/presets/<name>.json`: the config's fields and, under `processor`, the
        tokenizer (a folder of the package or a Hub id), the image placeholder token and the image processor's
        settings — everything a preset is. A preset with `"base": "<other preset>"` holds only what differs: its
        fields replace the other's (sub-configs whole), its `processor` settings one by one."""
        path = PRESETS_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(
                f"Unknown MicroVLM preset {name!r}: expected one of {cls.preset_names()} (files in {PRESETS_DIR}). "
                "Presets ship with the `microvlm` package; load a saved model folder with from_pretrained instead."
            )
        values = json.loads(path.read_text())
        values.pop("_comment", None)
        base = values.pop("base", None)
        if base is None:
            return values
        # A preset built on another: its fields replace the base's, its `processor` settings key by key.
        merged = cls.read_preset(base)
        processor = {**merged.pop("processor"), **values.pop("processor", {})}
        return {**merged, **values, "processor": processor}

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MicroVLMConfig":
        """Build a config from a preset shipped in `microvlm/presets/<name>.json`, e.g. "tiny" or "microvlm-v".

        Keyword `overrides` replace top-level fields (e.g. `use_memory=True`).
        """
        values = cls.read_preset(name)
        values.pop("processor")
        values.update(overrides)
        return cls(**values)
