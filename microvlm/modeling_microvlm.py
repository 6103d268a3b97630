"""MicroVLM: a vision tower, an adapter that turns patches into prefix tokens, a causal LM and an alignment head.

Layout of one sequence (LLaVA's convention): the processor expands an image placeholder into `k` placeholder
tokens; `forward` overwrites their embeddings with the adapter's `k` prefix tokens (`masked_scatter`) and runs the
language model on the fused embeddings. Every size comes from [`MicroVLMConfig`].
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .alignment import MicroVLMAlignmentHead, masked_mean
from .configuration_microvlm import MicroVLMConfig
from .vision_adapter import MicroVLMVisionAdapter

logger = logging.get_logger(__name__)


@dataclass
class MicroVLMCausalLMOutput(ModelOutput):
    """Output of [`MicroVLMForCausalLM`].

    Args:
        loss: total loss = lm_loss_weight·lm_loss + alignment_loss_weight·alignment_loss (when labels are given).
        logits: (batch, seq, vocab) next-token scores.
        past_key_values: the language model's cache.
        hidden_states, attentions: the language model's, when requested.
        lm_loss: next-token cross-entropy over text tokens only (image placeholders and padding ignored).
        alignment_loss: bidirectional InfoNCE between projected CLS and mean-pooled text embeddings.
        alignment_logits: (batch, batch) image→text similarity logits scaled by 1/τ.
        image_prefix: (batch, k, hidden) the adapter's prefix tokens.
        image_attention: (batch, k, num_patches) the adapter's pooling attention, when `output_attentions`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    lm_loss: torch.FloatTensor | None = None
    alignment_loss: torch.FloatTensor | None = None
    alignment_logits: torch.FloatTensor | None = None
    image_prefix: torch.FloatTensor | None = None
    image_attention: torch.FloatTensor | None = None


@dataclass
class MicroVLMImageFeatures(ModelOutput):
    """Image encodings: `cls` (batch, vision_dim), `prefix` (batch, k, hidden), `attention` (batch, k, patches)."""

    cls: torch.FloatTensor | None = None
    prefix: torch.FloatTensor | None = None
    attention: torch.FloatTensor | None = None


def text_position_ids(attention_mask: torch.Tensor, seq_len: int) -> torch.LongTensor:
    """Positions counted over real tokens only, for the last `seq_len` columns of a 2-D mask (batch, total).

    Left padding then starts every row at position 0, so a padded batch and each row alone see the same positions,
    and training (full sequence) and cached decoding (one new column at a time) agree.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -seq_len:]


class MicroVLMPreTrainedModel(PreTrainedModel):
    config_class = MicroVLMConfig
    config: MicroVLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]
    _no_split_modules = ["MicroVLMVisionAdapter"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, MicroVLMVisionAdapter):
            init.normal_(module.queries, mean=0.0, std=std)
            init.normal_(module.position_embeddings, mean=0.0, std=std)
        elif isinstance(module, MicroVLMAlignmentHead):
            init.constant_(module.log_logit_scale, module.initial_log_logit_scale)


class MicroVLMForCausalLM(MicroVLMPreTrainedModel, GenerationMixin):
    """Vision tower (any `AutoModel`) → [`MicroVLMVisionAdapter`] → prefix tokens → causal LM (any
    `AutoModelForCausalLM`), plus [`MicroVLMAlignmentHead`].

    The language model keeps its own head and its own tied-weight declaration (Qwen2.5 ties `lm_head` to
    `embed_tokens`); transformers gathers it into this model's `all_tied_weights_keys`, so the tie survives
    save/load and the tied matrix is stored once.
    """

    def __init__(self, config: MicroVLMConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config, **config.vision_tower_kwargs)
        self.adapter = MicroVLMVisionAdapter(config)
        self.alignment = MicroVLMAlignmentHead(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_image_features(self, pixel_values: torch.FloatTensor, output_attentions: bool = False) -> MicroVLMImageFeatures:
        """pixel_values (B, 3, H, W) → CLS (B, Dv) for alignment and prefix tokens (B, k, D) for the LM."""
        tokens = self.vision_tower(pixel_values=pixel_values).last_hidden_state
        patches = tokens[:, -self.config.num_patches :]
        # DeiT puts CLS and a distillation token before the patches: the patches are always the last ones.
        cls = tokens[:, 0] if self.config.vision_cls_token else patches.mean(1)
        prefix, attention = self.adapter(patches.to(self.adapter.input_proj.weight.dtype), output_attentions)
        return MicroVLMImageFeatures(cls=cls, prefix=prefix, attention=attention)

    def image_placeholder_mask(self, input_ids: torch.LongTensor, num_images: int) -> torch.BoolTensor:
        """(B, T) mask of the image placeholder positions; raises when their count does not match the images."""
        mask = input_ids == self.config.image_token_id
        expected = num_images * self.config.num_image_tokens
        found = int(mask.sum())
        if found != expected:
            raise ValueError(
                f"MicroVLM: input_ids hold {found} image placeholder tokens (id {self.config.image_token_id}) but "
                f"{num_images} image(s) need {expected} ({self.config.num_image_tokens} each). Build inputs with "
                "MicroVLMProcessor, which expands each image placeholder to the right count."
            )
        return mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MicroVLMCausalLMOutput:
        r"""
        Args:
            input_ids: (B, T) token ids; image placeholders (`config.image_token_id`) mark where the prefix goes.
            pixel_values: (B_img, 3, H, W), one image per `num_image_tokens` placeholders, in order.
            attention_mask: (B, T_total) 1 for real tokens, 0 for padding (left padding for generation).
            position_ids: (B, T); derived from `attention_mask` over real tokens when omitted.
            labels: (B, T) next-token targets aligned with `input_ids` (shifted inside); -100 is ignored, and so are
                image placeholders and padding whatever their label.
            kwargs: passed to the language model (e.g. `num_items_in_batch` from the Trainer is used for the loss).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MicroVLM.forward: give exactly one of input_ids or inputs_embeds")
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        text_embeds = inputs_embeds

        image = None
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("MicroVLM.forward: pixel_values need input_ids to locate the image placeholders")
            image = self.get_image_features(pixel_values, output_attentions=bool(output_attentions))
            placeholders = self.image_placeholder_mask(input_ids, pixel_values.shape[0])
            inputs_embeds = inputs_embeds.masked_scatter(
                placeholders.unsqueeze(-1), image.prefix.to(inputs_embeds.dtype)
            )

        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            position_ids = text_position_ids(attention_mask, inputs_embeds.shape[1])

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

        loss = lm_loss = alignment_loss = alignment_logits = None
        if labels is not None:
            labels = self._text_only_labels(labels, input_ids, attention_mask)
            lm_loss = ForCausalLMLoss(
                outputs.logits, labels, self.config.text_config.vocab_size, num_items_in_batch=num_items_in_batch
            )
            loss = self.config.lm_loss_weight * lm_loss
            if image is not None and self.config.alignment_loss_weight:
                if pixel_values.shape[0] != input_ids.shape[0]:
                    raise ValueError(
                        f"MicroVLM alignment pairs one image with one text: got {pixel_values.shape[0]} images for "
                        f"{input_ids.shape[0]} texts. Set alignment_loss_weight=0 to train multi-image inputs."
                    )
                text_mask = input_ids != self.config.image_token_id
                if attention_mask is not None:
                    text_mask = text_mask & attention_mask[:, -input_ids.shape[1] :].bool()
                alignment_loss, alignment_logits = self.alignment(image.cls, text_embeds, text_mask)
                loss = loss + self.config.alignment_loss_weight * alignment_loss

        return MicroVLMCausalLMOutput(
            loss=loss,
            logits=outputs.logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            lm_loss=lm_loss,
            alignment_loss=alignment_loss,
            alignment_logits=alignment_logits,
            image_prefix=image.prefix if image is not None else None,
            image_attention=image.attention if image is not None else None,
        )

    def _text_only_labels(
        self, labels: torch.LongTensor, input_ids: torch.LongTensor | None, attention_mask: torch.Tensor | None
    ) -> torch.LongTensor:
        """Labels with image placeholders and padding set to -100, whatever the caller put there."""
        labels = labels.clone()
        if input_ids is not None:
            labels[input_ids == self.config.image_token_id] = -100
        if attention_mask is not None and attention_mask.dim() == 2:
            labels[attention_mask[:, -labels.shape[1] :] == 0] = -100
        return labels

    def embed_images_and_texts(
        self, pixel_values: torch.FloatTensor, input_ids: torch.LongTensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm embeddings for retrieval: images (B_img, D) from the projected CLS, texts (B, D) from
        mean-pooled text-token embeddings (placeholders and padding excluded)."""
        image_cls = self.get_image_features(pixel_values).cls
        text_mask = (input_ids != self.config.image_token_id) & attention_mask.bool()
        texts = masked_mean(self.get_input_embeddings()(input_ids), text_mask)
        images = self.alignment.proj(image_cls)
        return nn.functional.normalize(images.float(), dim=-1), nn.functional.normalize(texts.float(), dim=-1)

    def prepare_inputs_for_generation(self, *args, pixel_values=None, is_first_iteration=False, **kwargs):
        # The image prefix is computed once: pixel_values go to the first forward only (or to every forward when
        # there is no cache). transformers 5.23 drops them after prefill itself; 5.0 needs this override.
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["pixel_values"] = pixel_values
        return model_inputs

    @classmethod
    def from_pretrained_backbones(
        cls,
        vision_model: str = "facebook/deit-tiny-patch16-224",
        language_model: str = "Qwen/Qwen2.5-0.5B",
        image_token_id: int | None = None,
        **config_overrides,
    ) -> "MicroVLMForCausalLM":
        """Build a MicroVLM whose vision tower and language model start from pretrained weights.

        `vision_model` and `language_model` are hub ids (needs internet) or local folders written by
        `save_pretrained`. The adapter and alignment head start from scratch. `image_token_id` defaults to
        Qwen's `<|image_pad|>` (151655), or to the config default for other tokenizers.
        """
        config_overrides.setdefault("vision_tower_kwargs", {})
        vision = AutoModel.from_pretrained(vision_model, **config_overrides["vision_tower_kwargs"])
        language = AutoModelForCausalLM.from_pretrained(language_model)
        if image_token_id is not None:
            config_overrides["image_token_id"] = image_token_id
        config = MicroVLMConfig(vision_config=vision.config, text_config=language.config, **config_overrides)
        model = cls(config)
        model.vision_tower.load_state_dict(vision.state_dict())
        model.language_model.load_state_dict(language.state_dict())
        return model


__all__ = ["MicroVLMForCausalLM", "MicroVLMPreTrainedModel"]
