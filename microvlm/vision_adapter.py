"""Vision→language adapter: projects vision patch tokens to the LM width and pools them into k prefix tokens."""

import torch
from torch import nn
from transformers.activations import ACT2FN

from .configuration_microvlm import MicroVLMConfig


class MicroVLMVisionAdapter(nn.Module):
    """Linear(vision→hidden) → MLP(hidden→m→hidden, `config.adapter_activation` (GELU; EmberVLM: ReLU), dropout
    on its output; m = `config.adapter_hidden_size`) [→ + learned per-patch positions, with
    `config.adapter_patch_positions`] → cross-attention pooling with k learned queries → learned positions →
    LayerNorm.

    Input patches (batch, num_patches, vision_dim); output prefix tokens (batch, k, hidden) with
    k = `config.num_image_tokens` (25 for DeiT-Tiny + Qwen2.5-0.5B).
    """

    def __init__(self, config: MicroVLMConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.input_proj = nn.Linear(config.vision_hidden_size, hidden)
        width = config.adapter_hidden_size
        # Dropout last, so that the Linear layers keep their names (mlp.0, mlp.2) whatever the config.
        self.mlp = nn.Sequential(
            nn.Linear(hidden, width),
            ACT2FN[config.adapter_activation],
            nn.Linear(width, hidden),
            nn.Dropout(config.adapter_dropout),
        )
        self.queries = nn.Parameter(torch.empty(config.num_image_tokens, hidden))
        # Keys (and values) of convolutional towers know no absolute position: give them one per patch.
        self.patch_position_embeddings = (
            nn.Parameter(torch.empty(config.num_patches, hidden)) if config.adapter_patch_positions else None
        )
        self.pool = nn.MultiheadAttention(hidden, config.adapter_num_heads, batch_first=True)
        self.position_embeddings = nn.Parameter(torch.empty(config.num_image_tokens, hidden))
        self.norm = nn.LayerNorm(hidden)

    def forward(
        self, patches: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """patches (B, P, Dv) → (prefix (B, k, D), pooling attention (B, k, P) averaged over heads, or None)."""
        keys = self.mlp(self.input_proj(patches))
        if self.patch_position_embeddings is not None:
            keys = keys + self.patch_position_embeddings
        queries = self.queries.unsqueeze(0).expand(patches.shape[0], -1, -1)
        pooled, attention = self.pool(queries, keys, keys, need_weights=return_attention)
        return self.norm(pooled + self.position_embeddings), attention
