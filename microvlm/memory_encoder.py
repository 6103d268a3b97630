"""What goes into the episodic memory: a code per episode step (written) or per question (read).

A code is a key followed by a value (`LarimarMemory` addresses with the key alone):

* key (`key_dim`): *which* step. Pooled from the text tokens by learned attention after a short convolution over
  neighbouring tokens, so that "image 12" (two tokens) and "image 1" differ. A step "image 2: two red circles on
  the left" and the question "what colour was the shape in image 2?" share the words that name the step, and the
  addressing loss (`MicroVLMEpisodicMemory.step_loss`) teaches the pooling to find them.
* value (2 × hidden wide): *what* the step held. The mean of the image-prefix tokens and the mean of the text tokens,
  each layer-normed on its own (prefix tokens are ~10× the norm of text embeddings and would drown the text),
  then standardised feature by feature over the data (batch norm: what every step shares — the words "image"
  and "on the", the prefix's positions — is >99% of a raw mean, and would leave the steps of an episode with
  codes at cosine 0.999). No projection follows: every further learned matrix between the words of a step and
  the LM's answer is one more factor of a deep linear chain that starts near zero and learns slowly.

A question has no image and no answer: its value carries little, and only its key matters for the read.
"""

import torch
from torch import nn

from .alignment import masked_mean


class MemoryEncoder(nn.Module):
    """Fused token embeddings (N, T, D) → memory codes (N, key_dim + 2·D)."""

    def __init__(self, hidden_size: int, key_dim: int, key_kernel_size: int = 3):
        super().__init__()
        if key_kernel_size % 2 == 0:
            raise ValueError(f"MemoryEncoder: key_kernel_size must be odd (centred context), got {key_kernel_size}")
        self.key_mixer = nn.Conv1d(hidden_size, hidden_size, key_kernel_size, padding=key_kernel_size // 2)
        self.key_score = nn.Linear(hidden_size, 1)
        self.key_proj = nn.Linear(hidden_size, key_dim)
        self.image_norm = nn.LayerNorm(hidden_size)
        self.text_norm = nn.LayerNorm(hidden_size)
        self.value_standardise = nn.BatchNorm1d(2 * hidden_size)
        self.code_dim = key_dim + 2 * hidden_size

    def forward(self, embeds: torch.Tensor, text_mask: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """embeds (N, T, D); text_mask, image_mask (N, T) bool: the real text tokens and the image-prefix tokens
        that the code may look at (a read code sees the prompt only) → codes (N, key_dim + 2·D)."""
        dtype = self.key_proj.weight.dtype
        embeds = embeds.to(dtype)
        text = embeds * text_mask.unsqueeze(-1).to(dtype)  # other tokens are zeros for the convolution
        mixed = nn.functional.gelu(self.key_mixer(text.transpose(1, 2)).transpose(1, 2))  # (N, T, D)
        scores = self.key_score(mixed).squeeze(-1).float().masked_fill(~text_mask, float("-inf"))  # (N, T)
        # Rows without text (a caption prompt is the image alone) pool nothing: their key is the projection's bias.
        weights = torch.nan_to_num(scores.softmax(-1), nan=0.0).to(dtype)
        key = self.key_proj(torch.einsum("nt,ntd->nd", weights, mixed))
        image = self.image_norm(masked_mean(embeds, image_mask))
        words = self.text_norm(masked_mean(embeds, text_mask))
        value = self._standardise(torch.cat([image, words], -1))
        return torch.cat([key, value], -1)

    def _standardise(self, features: torch.Tensor) -> torch.Tensor:
        """Batch norm (N, F); a single row in training (no batch statistics) uses the running ones."""
        norm = self.value_standardise
        use_batch = self.training and features.shape[0] > 1
        return nn.functional.batch_norm(
            features, norm.running_mean, norm.running_var, norm.weight, norm.bias, use_batch, norm.momentum, norm.eps
        )


__all__ = ["MemoryEncoder"]
