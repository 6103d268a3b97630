"""How memory read-outs reach the language model: ScopeNet decides whether, W_M decides what (per-layer K/V)."""

import torch
from torch import nn


class ScopeNet(nn.Module):
    """Gate (B,) in [0, 1] from a pooled context (B, C): MLP C→h(→h …)→1 with `num_layers` hidden layers of width
    h, each followed by ReLU and dropout, and a sigmoid (2 layers: C→h→h→1; 1 layer: the seed's C→256→1).

    Trained (1) end to end through the soft gate on the memory's values in training, and (2) by BCE against
    `scope_targets` when a batch has them (1 for rows that need the memory, e.g. episodic-recall questions).
    """

    def __init__(self, input_dim: int, hidden_size: int = 256, dropout: float = 0.1, num_layers: int = 2):
        super().__init__()
        widths = [input_dim] + [hidden_size] * num_layers
        hidden = [
            module
            for width_in, width_out in zip(widths[:-1], widths[1:])
            for module in (nn.Linear(width_in, width_out), nn.ReLU(), nn.Dropout(dropout))
        ]
        self.net = nn.Sequential(*hidden, nn.Linear(hidden_size, 1))

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        # The bias's dtype, not the weight's: an exported ternary layer keeps its weight packed as uint8.
        return torch.sigmoid(self.net(context.to(self.net[0].bias.dtype)).squeeze(-1).float())


class MemoryKVProjection(nn.Module):
    """W_M: read-outs (B, n_read, C) → per decoder layer a (key, value) pair, each
    (B, num_key_value_heads, n_read · tokens_per_read, head_dim) — the LM's GQA cache layout (2 KV heads × 64 for
    Qwen2.5-0.5B, not its 14 query heads)."""

    def __init__(
        self, code_dim: int, num_layers: int, num_key_value_heads: int, head_dim: int, tokens_per_read: int = 1
    ):
        super().__init__()
        self.num_layers, self.num_key_value_heads, self.head_dim = num_layers, num_key_value_heads, head_dim
        self.tokens_per_read = tokens_per_read
        self.proj = nn.Linear(code_dim, num_layers * 2 * tokens_per_read * num_key_value_heads * head_dim)

    def forward(self, readouts: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        batch, reads = readouts.shape[:2]
        kv = self.proj(readouts.to(self.proj.bias.dtype))  # bias: a packed ternary weight is uint8
        # (B, reads, layers, 2, tokens, heads, head_dim) → per layer (B, heads, reads·tokens, head_dim)
        kv = kv.view(batch, reads, self.num_layers, 2, self.tokens_per_read, self.num_key_value_heads, self.head_dim)
        kv = kv.permute(2, 3, 0, 5, 1, 4, 6).reshape(
            self.num_layers, 2, batch, self.num_key_value_heads, reads * self.tokens_per_read, self.head_dim
        )
        return tuple((kv[layer, 0], kv[layer, 1]) for layer in range(self.num_layers))
