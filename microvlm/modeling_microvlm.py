"""MicroVLM: a vision tower, an adapter that turns patches into prefix tokens, a causal LM, a CLIP-style alignment
head and a Larimar episodic memory read into the LM's attention as past key/values.

Layout of one sequence (LLaVA's convention): the processor expands an image placeholder into `k` placeholder
tokens; the model overwrites their embeddings with the adapter's `k` prefix tokens (`masked_scatter`) and runs the
language model on the fused embeddings. With the memory on, the first forward of a sequence reads the memory and
puts its key/values in front of the text in the cache. Every size comes from [`MicroVLMConfig`].
"""

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import ModelOutput

from .alignment import MicroVLMAlignmentHead, equal_sequences, text_token_mask
from .bitnet import convert_language_model_to_bitlinear, master_state_dict
from .configuration_microvlm import MicroVLMConfig
from .distillation import distillation_loss
from .episodic_memory import MemoryRead, MicroVLMEpisodicMemory
from .larimar_memory import LarimarMemory, MemoryState
from .memory_cache import MemoryCache

# transformers 5.0 copies only the direct relative imports of a local remote-code folder: name every module the
# model needs here, even those only used through another one.
from .memory_encoder import MemoryEncoder  # noqa: F401
from .memory_injection import MemoryKVProjection, ScopeNet  # noqa: F401
from .packed_weights import apply_weight_formats, check_packed_weights, check_safetensors_files
from .reasoning_head import ReasoningHead, reasoning_losses
from .repvit import RepViTModel  # noqa: F401
from .ternary_kernel import ternary_linear  # noqa: F401
from .two_stream_vision import TwoStreamVisionModel  # noqa: F401
from .vision_adapter import MicroVLMVisionAdapter


@dataclass
class MicroVLMImageFeatures(ModelOutput):
    """Image encodings: `cls` (batch, vision_dim), `prefix` (batch, k, hidden), `attention` (batch, k, patches)."""

    cls: torch.FloatTensor | None = None
    prefix: torch.FloatTensor | None = None
    attention: torch.FloatTensor | None = None


@dataclass
class MicroVLMModelOutput(ModelOutput):
    """Output of [`MicroVLMModel`]: the LM's `last_hidden_state` (batch, seq, hidden), cache, hidden states and
    attentions, plus `image` ([`MicroVLMImageFeatures`]) and `memory` ([`MemoryRead`]) when used."""

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image: MicroVLMImageFeatures | None = None
    memory: MemoryRead | None = None


@dataclass
class MicroVLMCausalLMOutput(ModelOutput):
    """Output of [`MicroVLMForCausalLM`].

    Args:
        loss: lm_loss_weight·LM + alignment_loss_weight·InfoNCE + memory_kl_weight·memory KL
            + addressing_kl_weight·addressing KL + memory_step_loss_weight·step loss
            + memory_reconstruction_weight·reconstruction + scope_loss_weight·ScopeNet BCE
            + distillation_weight·distillation + reasoning_answer_weight·answer CE
            + reasoning_consistency_weight·consistency BCE (terms that apply).
        logits: (batch, seq, vocab) next-token scores.
        past_key_values, hidden_states, attentions: the language model's.
        lm_loss: next-token cross-entropy over text tokens only (image placeholders and padding ignored).
        alignment_loss: bidirectional target-aware InfoNCE between the projected image embedding (see
            `config.alignment_image_source`) and mean-pooled text embeddings; rows with equal texts are all positives.
        alignment_logits: (images, images) image→text similarity logits scaled by 1/τ.
        image_prefix: (images, k, hidden) the adapter's prefix tokens.
        image_attention: (images, k, num_patches) the adapter's pooling attention, when `output_attentions`.
        memory_kl, addressing_kl: Larimar's KL terms (see `LarimarMemory.read`), when the memory was read.
        memory_step_loss: cross-entropy that each recall question's key picks the step it asks about (see
            `MicroVLMEpisodicMemory.step_loss`), when the batch has episodes and `memory_target_step`.
        memory_reconstruction_loss: Larimar's reconstruction term, how far each written episode step's code is
            from what it reads back (see `LarimarMemory.reconstruction_error`), when the batch has episodes and
            `config.memory_reconstruction_weight` is not 0.
        scope_gate: (batch,) ScopeNet's gate in [0, 1]; at inference rows below `scope_threshold` got no memory.
        scope_loss: BCE of `scope_gate` against the `scope_targets` given to `forward`.
        reasoning_steps, reasoning_consistency, reasoning_num_steps, answer_logits: the reasoning module's states
            (batch, S, hidden), consistency scores (batch, S), steps taken (batch,) and answer logits (batch, A),
            with `config.use_reasoning`, on a sequence's first forward (see `reasoning_head.py`).
        reasoning_answer_loss, reasoning_consistency_loss: its losses, when `answer_targets` are given.
        distillation_loss: τ²·KL(teacher ‖ student) against the `teacher_logits` given to `forward`.
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
    memory_kl: torch.FloatTensor | None = None
    addressing_kl: torch.FloatTensor | None = None
    memory_step_loss: torch.FloatTensor | None = None
    memory_reconstruction_loss: torch.FloatTensor | None = None
    scope_gate: torch.FloatTensor | None = None
    scope_loss: torch.FloatTensor | None = None
    reasoning_steps: torch.FloatTensor | None = None
    reasoning_consistency: torch.FloatTensor | None = None
    reasoning_num_steps: torch.LongTensor | None = None
    answer_logits: torch.FloatTensor | None = None
    reasoning_answer_loss: torch.FloatTensor | None = None
    reasoning_consistency_loss: torch.FloatTensor | None = None
    distillation_loss: torch.FloatTensor | None = None


def text_position_ids(attention_mask: torch.Tensor, seq_len: int) -> torch.LongTensor:
    """Positions counted over real tokens only, for the last `seq_len` columns of a 2-D mask (batch, total).

    Left padding then starts every row at position 0, so a padded batch and each row alone see the same positions,
    and training (full sequence) and cached decoding (one new column at a time) agree.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -seq_len:]


def _is_checkpointing(model: PreTrainedModel) -> bool:
    # transformers 5.23 renamed is_gradient_checkpointing to is_activation_checkpointing (5.0 has only the former).
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


class MicroVLMPreTrainedModel(PreTrainedModel):
    config_class = MicroVLMConfig
    config: MicroVLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]
    _no_split_modules = ["MicroVLMVisionAdapter"]
    # Every loss term is a per-batch mean, so the Trainer must scale it for gradient accumulation itself rather
    # than hand us `num_items_in_batch` (which would only fit the LM term).
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, MicroVLMVisionAdapter):
            init.normal_(module.queries, mean=0.0, std=std)
            init.normal_(module.position_embeddings, mean=0.0, std=std)
            if module.patch_position_embeddings is not None:
                init.normal_(module.patch_position_embeddings, mean=0.0, std=std)
        elif isinstance(module, MicroVLMAlignmentHead):
            init.constant_(module.log_logit_scale, module.initial_log_logit_scale)
        elif isinstance(module, LarimarMemory):
            init.normal_(module.prior_mean, mean=0.0, std=1.0)  # unit scale, like the layer-normed codes
            init.zeros_(module.prior_log_variance)
            init.constant_(module.addressing_log_variance, module.addressing_log_variance_init)


class MicroVLMModel(MicroVLMPreTrainedModel):
    """The MicroVLM body: vision tower (any `AutoModel`), [`MicroVLMVisionAdapter`], [`MicroVLMAlignmentHead`],
    [`MicroVLMEpisodicMemory`] and the language model's decoder (any `AutoModel` text config), without LM head."""

    def __init__(self, config: MicroVLMConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config, **config.vision_tower_kwargs)
        self.adapter = MicroVLMVisionAdapter(config)
        self.alignment = MicroVLMAlignmentHead(config)
        self.memory = MicroVLMEpisodicMemory(config)
        self.language_model = AutoModel.from_config(config.text_config)
        if config.lm_use_bitnet:  # BitNet b1.58 ternary projections (same parameter names)
            convert_language_model_to_bitlinear(self.language_model)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def train(self, mode: bool = True) -> "MicroVLMModel":
        """`nn.Module.train`, except that a vision tower without trainable parameters stays in eval mode: a frozen
        tower (stage 2) keeps the batch-norm statistics it was trained with and gives the features it will give at
        inference, rather than per-batch statistics."""
        super().train(mode)
        if mode and not any(param.requires_grad for param in self.vision_tower.parameters()):
            self.vision_tower.eval()
        return self

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_image_features(
        self, pixel_values: torch.FloatTensor, output_attentions: bool = False
    ) -> MicroVLMImageFeatures:
        """pixel_values (B, 3, H, W) → CLS (B, Dv) for alignment and prefix tokens (B, k, D) for the LM."""
        tokens = self.vision_tower(pixel_values=pixel_values).last_hidden_state
        if tokens.dim() == 4:  # convolutional towers return (B, C, H, W) maps: one token per position
            tokens = tokens.flatten(2).transpose(1, 2)
        # DeiT puts CLS and a distillation token before the patches: the patches are always the last ones.
        patches = tokens[:, -self.config.num_patches :]
        cls = tokens[:, 0] if self.config.vision_cls_token else patches.mean(1)
        prefix, attention = self.adapter(patches.to(self.adapter.input_proj.weight.dtype), output_attentions)
        return MicroVLMImageFeatures(cls=cls, prefix=prefix, attention=attention)

    def image_placeholder_mask(self, input_ids: torch.LongTensor, num_images: int) -> torch.BoolTensor:
        """(B, T) mask of the image placeholder positions; raises when their count does not match the images."""
        mask = input_ids == self.config.image_token_id
        expected, found = num_images * self.config.num_image_tokens, int(mask.sum())
        if found != expected:
            raise ValueError(
                f"MicroVLM: input_ids hold {found} image placeholder tokens (id {self.config.image_token_id}) but "
                f"{num_images} image(s) need {expected} ({self.config.num_image_tokens} each). Build inputs with "
                "MicroVLMProcessor, which expands each image placeholder to the right count."
            )
        return mask

    def fused_embeddings(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, MicroVLMImageFeatures | None]:
        """Token embeddings (B, T, C) with the image placeholders replaced by the adapter's prefix tokens."""
        embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds, None
        image = self.get_image_features(pixel_values, output_attentions)
        mask = self.image_placeholder_mask(input_ids, pixel_values.shape[0]).unsqueeze(-1)
        return embeds.masked_scatter(mask, image.prefix.to(embeds.dtype)), image

    def memory_codes(
        self, inputs_embeds: torch.Tensor, input_ids: torch.LongTensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Memory codes (B, C) of fused embeddings (B, T, D) over the tokens where `mask` (B, T) is 1 (default
        all): image-prefix tokens (placeholders in `input_ids`) feed the value, text tokens key and value."""
        seq_len = inputs_embeds.shape[1]
        real = torch.ones(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        if mask is not None:
            real = mask[:, -seq_len:].bool()
        image = input_ids == self.config.image_token_id if input_ids is not None else torch.zeros_like(real)
        return self.memory.encoder(inputs_embeds, real & ~image, real & image)

    def episode_codes(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.FloatTensor | None,
        episode_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (E, B, C) and write weights (E, B) of episodes given as (B, E, T) ids/mask, (B, E, 3, H, W) pixels
        (or None) and (B, E) `episode_mask` (default: every step real, weight 1).

        Only the real steps (`episode_mask` > 0) are encoded; padding steps get zero codes.
        """
        batch, steps = input_ids.shape[:2]
        real = (
            (episode_mask > 0).flatten() if episode_mask is not None else torch.ones(batch * steps, dtype=torch.bool)
        )
        real = real.to(input_ids.device)
        ids, mask = input_ids.flatten(0, 1)[real], attention_mask.flatten(0, 1)[real]
        pixels = pixel_values.flatten(0, 1)[real] if pixel_values is not None else None
        embeds, _ = self.fused_embeddings(ids, pixels)
        codes = self.memory_codes(embeds, ids, mask)
        out = codes.new_zeros(batch * steps, codes.shape[-1]).index_put((real.nonzero()[:, 0],), codes)
        weights = episode_mask.T.to(codes) if episode_mask is not None else codes.new_ones(steps, batch)
        return out.view(batch, steps, -1).transpose(0, 1), weights

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        use_memory: bool | None = None,
        memory_state: MemoryState | None = None,
        episode_input_ids: torch.LongTensor | None = None,
        episode_attention_mask: torch.Tensor | None = None,
        episode_pixel_values: torch.FloatTensor | None = None,
        episode_mask: torch.Tensor | None = None,
        memory_query_mask: torch.Tensor | None = None,
        memory_target_step: torch.LongTensor | None = None,
        **kwargs,
    ) -> MicroVLMModelOutput:
        r"""
        Args:
            input_ids: (B, T) token ids; image placeholders (`config.image_token_id`) mark where the prefix goes.
            pixel_values: (B_img, 3, H, W), one image per `num_image_tokens` placeholders, in order.
            attention_mask: (B, T_total) 1 for real tokens, 0 for padding, over the text (and, optionally, the
                memory columns in front of it).
            position_ids: (B, T); derived from the text part of `attention_mask` when omitted.
            use_memory: read the episodic memory into the LM's attention (default `config.use_memory`). It is read
                on the first call of a sequence (empty or no cache) and travels in the returned [`MemoryCache`].
            memory_state: read this state (batch B or 1) instead of the written one (see `MicroVLMEpisodicMemory`).
            episode_input_ids, episode_attention_mask, episode_pixel_values, episode_mask: (B, E, ...) one episode
                per row, written into a fresh memory that the row then reads: how the episodic-recall task trains
                and is evaluated. `episode_mask` (B, E) marks real steps; padding steps are written with weight 0.
                Implies `use_memory=True`.
            memory_query_mask: (B, T) the tokens the read code pools over (default: every real token, which in
                `generate` is the prompt). [`MicroVLMForCausalLM`] derives it from `labels`: the prompt only, so
                no target token ever reaches the read and training reads like `generate`.
            memory_target_step: (B,) the episode step each row asks about (−100: none); gives `step_loss`.
            kwargs: passed to the language model.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MicroVLM.forward: give exactly one of input_ids or inputs_embeds")
        image = None
        if inputs_embeds is None:
            inputs_embeds, image = self.fused_embeddings(input_ids, pixel_values, bool(output_attentions))
        elif pixel_values is not None:
            raise ValueError("MicroVLM.forward: pixel_values need input_ids to locate the image placeholders")

        memory = steps = None
        first_call = past_key_values is None or past_key_values.get_seq_length() == 0
        if first_call and episode_input_ids is not None:
            use_memory = True
            steps, step_weights = self.episode_codes(
                episode_input_ids, episode_attention_mask, episode_pixel_values, episode_mask
            )
            memory_state = self.memory.write(steps, step_weights)
        if (self.config.use_memory if use_memory is None else use_memory) and first_call:
            if _is_checkpointing(self.language_model) and self.training:
                raise ValueError(
                    "MicroVLM: the episodic memory reaches the LM as past_key_values, which transformers' gradient "
                    "checkpointing drops. Train with use_memory=False, or disable gradient checkpointing "
                    "(TrainingArguments(gradient_checkpointing=False); TRL's SFTConfig turns it on by default)."
                )
            query_mask = attention_mask if memory_query_mask is None else memory_query_mask
            questions = self.memory_codes(inputs_embeds, input_ids, query_mask)
            memory = self.memory.read(questions, memory_state)
            if steps is not None and memory_target_step is not None:
                memory.step_loss = self.memory.step_loss(questions, steps, step_weights, memory_target_step)
            if steps is not None and self.config.memory_reconstruction_weight:
                memory.reconstruction_loss = self.memory.reconstruction_loss(steps, step_weights, memory_state)
            # A fresh cache per sequence: caches are mutated in place, so one must never be reused.
            past_key_values = MemoryCache(self.config.text_config, memory.key_values, memory.mask)

        # transformers 5.0's generate passes a cache_position that counts text tokens only; the LM recomputes it
        # from the cache (memory included) when it is absent.
        kwargs.pop("cache_position", None)
        seq_len = inputs_embeds.shape[1]
        text_mask = attention_mask
        if isinstance(past_key_values, MemoryCache):
            attention_mask = past_key_values.full_attention_mask(attention_mask, seq_len)
            text_mask = attention_mask[:, past_key_values.num_memory_tokens :]
        if position_ids is None and text_mask is not None and text_mask.dim() == 2:
            position_ids = text_position_ids(text_mask, seq_len)

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        return MicroVLMModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image=image,
            memory=memory,
        )


class MicroVLMForCausalLM(MicroVLMPreTrainedModel, GenerationMixin):
    """[`MicroVLMModel`] with the LM head, the composite loss, generation and the episodic-memory API."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: MicroVLMConfig):
        super().__init__(config)
        self.model = MicroVLMModel(config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.reasoning_head = ReasoningHead(config) if config.use_reasoning else None
        # LM families name their embedding differently (GPT-2: `wte`): tie to whatever this one is called.
        embedding = self.model.get_input_embeddings().weight
        name = next(n for n, p in self.model.language_model.named_parameters() if p is embedding)
        self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{name}"}
        self.post_init()
        if config.weight_formats:  # an exported folder: rebuild the packed layers its tensors belong to
            apply_weight_formats(self, config.weight_formats)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "MicroVLMForCausalLM":
        """`PreTrainedModel.from_pretrained`, with the weight files of a local folder checked first (a truncated
        file fails naming the tensor) and the packed tensors of an exported one checked after loading."""
        if os.path.isdir(pretrained_model_name_or_path):
            check_safetensors_files(pretrained_model_name_or_path)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        check_packed_weights(model)
        return model

    def enable_bitnet(self, language_model: bool = True, memory: bool = False) -> int:
        """Make the LM body's projections (and, with `memory`, W_M and ScopeNet) BitNet b1.58 ternary layers in
        place, keeping their parameters, and set `lm_use_bitnet` / `memory_use_bitnet` so that a saved copy is
        rebuilt the same way. Returns the number of layers converted (0 for those already ternary)."""
        converted = 0
        if language_model:
            self.config.lm_use_bitnet = True
            converted += convert_language_model_to_bitlinear(self.model.language_model)
        if memory:
            self.config.memory_use_bitnet = True
            converted += self.model.memory.convert_to_bitnet()
        return converted

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(
        self, pixel_values: torch.FloatTensor, output_attentions: bool = False
    ) -> MicroVLMImageFeatures:
        return self.model.get_image_features(pixel_values, output_attentions)

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
        use_memory: bool | None = None,
        memory_state: MemoryState | None = None,
        episode_input_ids: torch.LongTensor | None = None,
        episode_attention_mask: torch.Tensor | None = None,
        episode_pixel_values: torch.FloatTensor | None = None,
        episode_mask: torch.Tensor | None = None,
        memory_query_mask: torch.Tensor | None = None,
        memory_target_step: torch.LongTensor | None = None,
        scope_targets: torch.Tensor | None = None,
        answer_targets: torch.LongTensor | None = None,
        teacher_logits: torch.FloatTensor | None = None,
        **kwargs,
    ) -> MicroVLMCausalLMOutput:
        r"""
        Args: as [`MicroVLMModel.forward`], plus
            labels: (B, T) next-token targets aligned with `input_ids` (shifted inside); -100 is ignored, and so are
                image placeholders and padding whatever their label. The memory is read from the prompt: the
                tokens before the first labelled one.
            logits_to_keep: compute logits for the last N positions only (0: all).
            memory_query_mask: as [`MicroVLMModel.forward`]; derived from `labels` when they are given.
            scope_targets: (B,) 1 where a row needs the memory, 0 where it does not; trains ScopeNet.
            answer_targets: (B,) class of each row for the reasoning module's answer head (-100: none). Not
                "answer_labels": the Trainer takes every argument named like a label as one, and would then skip
                the loss of batches without it.
            teacher_logits: (B, T, V) a teacher's logits on the same inputs: adds the distillation term (needs
                `labels`, which say which positions count).
        """
        text_labels = self._text_only_labels(labels, input_ids, attention_mask) if labels is not None else None
        # Measured before the LM runs: it fills the cache in place.
        first_call = past_key_values is None or past_key_values.get_seq_length() == 0
        if memory_query_mask is None and text_labels is not None:
            memory_query_mask = self._prompt_mask(text_labels, attention_mask)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            use_memory=use_memory,
            memory_state=memory_state,
            episode_input_ids=episode_input_ids,
            episode_attention_mask=episode_attention_mask,
            episode_pixel_values=episode_pixel_values,
            episode_mask=episode_mask,
            memory_query_mask=memory_query_mask,
            memory_target_step=memory_target_step,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        image, memory = outputs.image, outputs.memory
        # Masks may cover memory columns in front of the text; the loss terms look at the last T columns only.
        text_mask = attention_mask
        loss = lm_loss = alignment_loss = alignment_logits = scope_loss = None
        if labels is not None:
            lm_loss = ForCausalLMLoss(logits, text_labels, self.config.text_config.vocab_size)
            loss = self.config.lm_loss_weight * lm_loss
            if image is not None and self.config.alignment_loss_weight:
                alignment_loss, alignment_logits = self._alignment(image, input_ids, text_mask)
                loss = loss + self.config.alignment_loss_weight * alignment_loss
            if memory is not None:
                loss = loss + self.config.memory_kl_weight * memory.memory_kl
                loss = loss + self.config.addressing_kl_weight * memory.addressing_kl
                if memory.step_loss is not None:
                    loss = loss + self.config.memory_step_loss_weight * memory.step_loss
                if memory.reconstruction_loss is not None:
                    loss = loss + self.config.memory_reconstruction_weight * memory.reconstruction_loss
        if memory is not None and scope_targets is not None:
            scope_loss = nn.functional.binary_cross_entropy(memory.gate.float(), scope_targets.float())
            loss = scope_loss * self.config.scope_loss_weight + (loss if loss is not None else 0.0)
        distillation = None
        if teacher_logits is not None and text_labels is not None:
            distillation = distillation_loss(
                logits, teacher_logits, text_labels[:, -logits.shape[1] :], self.config.distillation_temperature
            )
            loss = loss + self.config.distillation_weight * distillation
        reasoning = answer_loss = consistency_loss = None
        if self.reasoning_head is not None and first_call:
            reasoning = self.reasoning_head(self._prompt_state(outputs.last_hidden_state, text_labels, text_mask))
            if answer_targets is not None:
                answer_loss, consistency_loss = reasoning_losses(reasoning, answer_targets)
                weighted = self.config.reasoning_answer_weight * answer_loss
                weighted = weighted + self.config.reasoning_consistency_weight * consistency_loss
                loss = weighted + (loss if loss is not None else 0.0)

        return MicroVLMCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            lm_loss=lm_loss,
            alignment_loss=alignment_loss,
            alignment_logits=alignment_logits,
            image_prefix=image.prefix if image is not None else None,
            image_attention=image.attention if image is not None else None,
            memory_kl=memory.memory_kl if memory is not None else None,
            addressing_kl=memory.addressing_kl if memory is not None else None,
            memory_step_loss=memory.step_loss if memory is not None else None,
            memory_reconstruction_loss=memory.reconstruction_loss if memory is not None else None,
            scope_gate=memory.gate if memory is not None else None,
            scope_loss=scope_loss,
            reasoning_steps=reasoning.steps if reasoning is not None else None,
            reasoning_consistency=reasoning.consistency if reasoning is not None else None,
            reasoning_num_steps=reasoning.num_steps if reasoning is not None else None,
            answer_logits=reasoning.answer_logits if reasoning is not None else None,
            reasoning_answer_loss=answer_loss,
            reasoning_consistency_loss=consistency_loss,
            distillation_loss=distillation,
        )

    def _text_only_labels(
        self, labels: torch.LongTensor, input_ids: torch.LongTensor | None, text_mask: torch.Tensor | None
    ) -> torch.LongTensor:
        """Labels with image placeholders and padding set to -100, whatever the caller put there."""
        labels = labels.clone()
        if input_ids is not None:
            labels[input_ids == self.config.image_token_id] = -100
        if text_mask is not None and text_mask.dim() == 2:
            labels[text_mask[:, -labels.shape[1] :] == 0] = -100
        return labels

    def _prompt_state(
        self, hidden: torch.Tensor, text_labels: torch.LongTensor | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The reasoning module's input (B, D): the LM's final hidden state (B, T, D) at each row's last prompt
        token, the last real token before the first labelled one (without labels: the last real token, which in
        `generate` is the prompt's last). Target tokens come later, so the answer text never reaches it."""
        if text_labels is not None:
            prompt = self._prompt_mask(text_labels, attention_mask).bool()
        elif attention_mask is not None and attention_mask.dim() == 2:
            prompt = attention_mask[:, -hidden.shape[1] :].bool()
        else:
            prompt = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        last = hidden.shape[1] - 1 - prompt.flip(-1).long().argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    @staticmethod
    def _prompt_mask(labels: torch.LongTensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T) 1 on the real tokens before the first labelled one: the prompt, what `generate` would see."""
        prompt = (labels != -100).long().cumsum(-1) == 0
        if attention_mask is not None and attention_mask.dim() == 2:
            prompt = prompt & attention_mask[:, -labels.shape[1] :].bool()
        return prompt.long()

    def _alignment(
        self, image: MicroVLMImageFeatures, input_ids: torch.LongTensor, text_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE over the rows that hold an image (recall questions, say, have none)."""
        placeholders_per_row = (input_ids == self.config.image_token_id).sum(1)
        with_image = placeholders_per_row > 0
        if not bool((placeholders_per_row[with_image] == self.config.num_image_tokens).all()):
            raise ValueError(
                "MicroVLM alignment pairs one image with one text: a row holds several images. "
                "Set alignment_loss_weight=0 to train multi-image inputs."
            )
        words = text_token_mask(input_ids, self.config.image_token_id, text_mask)
        ids, words = input_ids[with_image], words[with_image]
        # Many rows share a caption (or a question and its answer): equal texts are all positives of an image.
        positives = equal_sequences(ids, words)
        return self.model.alignment(self._alignment_input(image), self.get_input_embeddings()(ids), words, positives)

    def _alignment_input(self, image: MicroVLMImageFeatures) -> torch.Tensor:
        """The image embedding the alignment head projects, (B_img, `config.alignment_input_size`)."""
        if self.config.alignment_image_source == "prefix":
            return image.prefix.flatten(1)
        return image.cls

    def embed_images_and_texts(
        self, pixel_values: torch.FloatTensor, input_ids: torch.LongTensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm embeddings for retrieval: images (B_img, D) from the projected image embedding (see
        `config.alignment_image_source`), texts (B, D) from mean-pooled text-token embeddings (placeholders and
        padding excluded)."""
        image = self.model.get_image_features(pixel_values)
        text_mask = text_token_mask(input_ids, self.config.image_token_id, attention_mask)
        images, texts = self.model.alignment.embed(
            self._alignment_input(image), self.get_input_embeddings()(input_ids), text_mask
        )
        return nn.functional.normalize(images.float(), dim=-1), nn.functional.normalize(texts.float(), dim=-1)

    # ------------------------------------------------------------------ episodic memory at inference

    @property
    def memory_state(self) -> MemoryState:
        """The written episodic memory (M (1, K, C), Σ (1, K, K)); the learned prior when nothing was written."""
        return self.model.memory.current_state

    @property
    def memory_written(self) -> bool:
        """Whether anything was written since loading (or the last `reset_memory()`)."""
        return self.model.memory.state is not None

    def reset_memory(self) -> None:
        """Forget every episode written since loading."""
        self.model.memory.reset()

    @torch.no_grad()
    def encode_memory(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Memory codes (B, C) of B inputs built like the model's (image placeholders + text): what a write stores
        for an episode step, and what a read addresses with for a question."""
        embeds, _ = self.model.fused_embeddings(input_ids, pixel_values)
        return self.model.memory_codes(embeds, input_ids, attention_mask)

    @torch.no_grad()
    def write_memory(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        weight: float = 1.0,
    ) -> MemoryState:
        """Write one episode into the model's memory: row i of the batch is step i. `weight=-1` with the same
        inputs removes exactly what a `+1` write of them added (Larimar's selective forgetting: a step is written
        at addresses that depend on its key alone). The memory persists across `generate` calls until
        `reset_memory()`, and `generate`/`forward` read it whenever the memory is on."""
        return self.model.memory.append(self.encode_memory(input_ids, pixel_values, attention_mask), weight=weight)

    @torch.no_grad()
    def write_episodes(
        self,
        episode_input_ids: torch.LongTensor,
        episode_attention_mask: torch.Tensor,
        episode_pixel_values: torch.FloatTensor | None = None,
        episode_mask: torch.Tensor | None = None,
        weight: float = 1.0,
        memory_state: MemoryState | None = None,
    ) -> MemoryState:
        """Batched writes, one episode per row, returned rather than kept: (B, E, T) ids/mask, (B, E, 3, H, W)
        pixels and (B, E) `episode_mask` (as `forward` takes them) on top of `memory_state` (default: the prior),
        each real step with `weight` (−1 forgets). Pass the result to `forward`/`generate` as `memory_state`."""
        codes, steps = self.model.episode_codes(
            episode_input_ids, episode_attention_mask, episode_pixel_values, episode_mask
        )
        return self.model.memory.write(codes, weight * steps, memory_state)

    @torch.no_grad()
    def forget_episodes(self, memory_state: MemoryState, **episodes: torch.Tensor) -> MemoryState:
        """Remove from `memory_state` the steps that a `write_episodes(**episodes)` added: an exact undo, whatever
        was written in between, since every write addresses against the prior (Larimar's selective forgetting).
        The same as `write_episodes(**episodes, weight=-1, memory_state=memory_state)`."""
        return self.write_episodes(**episodes, weight=-1.0, memory_state=memory_state)

    @torch.no_grad()
    def memory_addresses(
        self,
        episode_input_ids: torch.LongTensor,
        episode_attention_mask: torch.Tensor,
        episode_pixel_values: torch.FloatTensor | None = None,
        episode_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Addressing weights (E, B, K) with which each step of each episode (inputs as `write_episodes`) reads
        the memory its episode wrote: step i of an episode should find the slots it was written at."""
        codes, steps = self.model.episode_codes(
            episode_input_ids, episode_attention_mask, episode_pixel_values, episode_mask
        )
        state = self.model.memory.write(codes, steps)
        return self.model.memory.address(codes, state)

    def save_memory(self, save_directory: str | os.PathLike) -> None:
        """Save the written memory beside the weights (`memory_state.safetensors`); `save_pretrained` does not."""
        self.model.memory.save(save_directory)

    def load_memory(self, save_directory: str | os.PathLike) -> None:
        """Load a memory saved by `save_memory`; raises FileNotFoundError if the folder has none."""
        self.model.memory.load(save_directory)

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
        preset: str | None = None,
        **config_overrides,
    ) -> "MicroVLMForCausalLM":
        """Build a MicroVLM whose vision tower and language model start from pretrained weights.

        `vision_model` and `language_model` are hub ids (needs internet) or local folders written by
        `save_pretrained`. The adapter, alignment head and memory start from scratch, sized by `preset`'s fields
        (e.g. "microvlm-m"; its backbone configs are replaced by the checkpoints') and then `config_overrides`.
        `image_token_id` defaults to the preset's, else Qwen's `<|image_pad|>` (151655).

        A packed BitNet b1.58 checkpoint (`quantization_config.quant_method == "bitnet"`, e.g.
        "microsoft/bitnet-b1.58-2B-4T") loads through transformers' BitNet quantizer; its ternary weights become
        latent weights of MicroVLM's own `BitLinear` layers (`lm_use_bitnet=True`) that compute exactly what the
        packed layers compute (see `bitnet.latent_from_packed`). Train from the bf16 master weights
        ("microsoft/bitnet-b1.58-2B-4T-bf16"): the packed ones put every weight on the ternary grid.
        """
        settings = {}
        if preset is not None:
            settings = MicroVLMConfig.read_preset(preset)
            for name in ("processor", "vision_config", "text_config"):
                settings.pop(name)
        settings.update(config_overrides)
        settings.setdefault("vision_tower_kwargs", {})
        if image_token_id is not None:
            settings["image_token_id"] = image_token_id
        vision = AutoModel.from_pretrained(vision_model, **settings["vision_tower_kwargs"])
        language = AutoModelForCausalLM.from_pretrained(language_model)
        text_config, language_state = language.config, language.base_model.state_dict()
        quantization = getattr(text_config, "quantization_config", None) or {}
        if not isinstance(quantization, dict):
            quantization = quantization.to_dict()
        if quantization.get("quant_method") == "bitnet":
            language_state = master_state_dict(language.base_model)
            text_config = type(text_config)(
                **{k: v for k, v in text_config.to_dict().items() if k != "quantization_config"}
            )
            settings["lm_use_bitnet"] = True
        config = MicroVLMConfig(vision_config=vision.config, text_config=text_config, **settings)
        model = cls(config)
        model.model.vision_tower.load_state_dict(vision.state_dict())
        model.model.language_model.load_state_dict(language_state)
        model.lm_head.load_state_dict(language.get_output_embeddings().state_dict())
        return model


__all__ = ["MicroVLMForCausalLM", "MicroVLMModel", "MicroVLMPreTrainedModel"]
