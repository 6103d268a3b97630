"""CLIP-style image–text alignment (the seeds' "EVO-1 alignment"): projected CLS against mean-pooled text."""

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


def info_nce(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bidirectional InfoNCE over a batch of matching pairs.

    image_embeds, text_embeds: (B, D), row i of each is a positive pair; logit_scale = 1/τ (scalar).
    Returns (loss, logits (B, B)): loss = ½·[CE(logits, I) + CE(logitsᵀ, I)], logits = scale · cos-sim.
    """
    image_embeds = F.normalize(image_embeds.float(), dim=-1)
    text_embeds = F.normalize(text_embeds.float(), dim=-1)
    logits = logit_scale.float() * image_embeds @ text_embeds.T
    targets = torch.arange(logits.shape[0], device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    return loss, logits


class MicroVLMAlignmentHead(nn.Module):
    """Projects the vision CLS (B, Dv) into the LM embedding space (B, D) and scores it against text."""

    def __init__(self, config: MicroVLMConfig):
        super().__init__()
        self.proj = nn.Linear(config.vision_hidden_size, config.text_config.hidden_size)
        # A parameter even when frozen, so that it is saved and loaded like every other weight.
        self.initial_log_logit_scale = math.log(1.0 / config.alignment_temperature)
        self.log_logit_scale = nn.Parameter(
            torch.tensor(self.initial_log_logit_scale), requires_grad=config.alignment_learnable_temperature
        )

    def forward(self, image_cls: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_cls (B, Dv), text_embeds (B, T, D), text_mask (B, T) → (InfoNCE loss, logits (B, B))."""
        # exp(log) keeps a learnable temperature positive; clamp like CLIP so it cannot blow up.
        scale = self.log_logit_scale.exp().clamp(max=100.0)
        return info_nce(self.proj(image_cls), masked_mean(text_embeds, text_mask), scale)
