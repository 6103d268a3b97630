"""CLIP-style image–text alignment (the seeds' "EVO-1 alignment"): a projected image embedding (the vision CLS, or
the adapter's flattened prefix) against mean-pooled text-token embeddings."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_microvlm import MicroVLMConfig


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (B, T, D) over the positions where `mask` (B, T) is true → (B, D); rows without any
    true position give zeros rather than NaN."""
    weights = mask.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def text_token_mask(
    input_ids: torch.Tensor, image_token_id: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) bool: true at text tokens, i.e. neither an image placeholder (`image_token_id`) nor padding (0 in
    `attention_mask`, whose last T columns count when it also covers past tokens; None: no padding)."""
    text = input_ids != image_token_id
    if attention_mask is not None:
        text = text & attention_mask[:, -input_ids.shape[1] :].bool()
    return text


def equal_sequences(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: rows i and j hold the same token sequence, where `ids` (B, T) counts only where `mask` (B, T)
    is true (padding and image placeholders may sit anywhere and in any number)."""
    # Move each row's kept tokens to its front, in order (a stable sort of the "dropped" flags), fill the rest.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    kept = mask.gather(1, order)
    compact = torch.where(kept, ids.gather(1, order), torch.full_like(ids, -1))
    return (compact.unsqueeze(1) == compact.unsqueeze(0)).all(-1)


def info_nce(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    positives: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bidirectional, target-aware InfoNCE.

    image_embeds, text_embeds: (B, D), row i of each is a pair; logit_scale = 1/τ (scalar); positives: (B, B) bool,
    true where image i and text j match (its diagonal must be true), e.g. where texts i and j are equal; None means
    the identity. Each row's target is uniform over its positives (soft targets), so two rows with the same caption
    are not pushed apart; with the identity this is CLIP's loss.
    Returns (loss, logits (B, B)): loss = ½·[CE(logits, P/ΣP) + CE(logitsᵀ, Pᵀ/ΣPᵀ)], logits = scale · cos-sim.
    """
    image_embeds = F.normalize(image_embeds.float(), dim=-1)
    text_embeds = F.normalize(text_embeds.float(), dim=-1)
    logits = logit_scale.float() * image_embeds @ text_embeds.T
    if positives is None:
        positives = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    elif not bool(positives.diagonal().all()):
        raise ValueError("info_nce: every image must be a positive of its own text (the diagonal of `positives`)")
    targets = positives.to(logits.dtype)
    image_to_text = F.cross_entropy(logits, targets / targets.sum(1, keepdim=True))
    text_to_image = F.cross_entropy(logits.T, targets.T / targets.T.sum(1, keepdim=True))
    return 0.5 * (image_to_text + text_to_image), logits


class MicroVLMAlignmentHead(nn.Module):
    """Projects an image embedding (B, `config.alignment_input_size`) into the alignment space (B, P),
    P = `config.alignment_dim`, and scores it against text.

    With `alignment_projection_dim` unset, P is the LM hidden size D and the mean-pooled text embedding is used as
    it is; with it set (MicroVLM-M: 512), the text side has its own projection D→P (`text_proj`).
    """

    def __init__(self, config: MicroVLMConfig):
        super().__init__()
        self.proj = nn.Linear(config.alignment_input_size, config.alignment_dim)
        hidden = config.text_config.hidden_size
        self.text_proj = nn.Linear(hidden, config.alignment_dim) if config.alignment_projection_dim else None
        # A parameter even when frozen, so that it is saved and loaded like every other weight.
        self.initial_log_logit_scale = math.log(1.0 / config.alignment_temperature)
        self.log_logit_scale = nn.Parameter(
            torch.tensor(self.initial_log_logit_scale), requires_grad=config.alignment_learnable_temperature
        )

    def embed(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two sides the head compares, not normalised: image_embeds (B_img, alignment_input_size) projected
        → (B_img, P), text_embeds (B, T, D) mean-pooled over `text_mask` (B, T) (and projected by `text_proj`
        when there is one) → (B, P)."""
        texts = masked_mean(text_embeds, text_mask)
        return self.proj(image_embeds), texts if self.text_proj is None else self.text_proj(texts)

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        positives: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeds (B, alignment_input_size), text_embeds (B, T, D), text_mask (B, T), positives (B, B) bool
        or None (see `info_nce`) → (InfoNCE loss, logits (B, B))."""
        # exp(log) keeps a learnable temperature positive; clamp like CLIP so it cannot blow up.
        scale = self.log_logit_scale.exp().clamp(max=100.0)
        return info_nce(*self.embed(image_embeds, text_embeds, text_mask), scale, positives)
