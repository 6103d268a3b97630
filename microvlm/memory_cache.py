"""The language model's cache with the episodic memory's key/values in front of the text.

Memory tokens sit at cache positions [0, n_mem) of every layer, as key/value pairs shaped
(batch, num_key_value_heads, n_mem, head_dim) — the LM's own GQA cache layout. They carry no RoPE rotation
(they are written after the LM's rotary step would have applied) and take no position: text positions are
counted over the text mask alone, so a sequence has the same positions with and without memory, in training
and in `generate`.
"""

import torch
from transformers.cache_utils import DynamicCache


class MemoryCache(DynamicCache):
    """A `DynamicCache` whose first `num_memory_tokens` positions hold memory key/values.

    `memory_mask` (batch, n_mem) is the attention mask of the memory columns: 1 where a row reads the memory,
    0 where ScopeNet switched it off. Callers of the model pass text-only masks; the model prepends
    `memory_mask` on every step, which this cache keeps across `generate`'s decode steps.
    """

    def __init__(self, config, key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...], memory_mask: torch.Tensor):
        super().__init__(config=config)
        for layer_idx, (key, value) in enumerate(key_values):
            self.update(key, value, layer_idx)
        self.memory_mask = memory_mask

    @property
    def num_memory_tokens(self) -> int:
        return self.memory_mask.shape[1]

    def full_attention_mask(self, attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor:
        """The 2-D mask over memory + cached text + new tokens, built from the caller's mask.

        The caller's (batch, text_len) mask covers the text only (what `generate` keeps extending); a mask that
        already covers the memory columns is returned unchanged. Prepending matters: transformers right-pads a
        2-D mask shorter than the cache, which would silently mask the newest tokens instead of the memory.
        """
        batch = self.memory_mask.shape[0]
        cached_text = self.get_seq_length() - self.num_memory_tokens
        if attention_mask is None:
            attention_mask = self.memory_mask.new_ones(batch, cached_text + seq_len)
        if attention_mask.shape[1] == self.num_memory_tokens + cached_text + seq_len:
            return attention_mask
        if attention_mask.shape[1] != cached_text + seq_len:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} columns; expected {cached_text + seq_len} (text) or "
                f"{self.num_memory_tokens + cached_text + seq_len} (memory + text)"
            )
        return torch.cat([self.memory_mask.to(attention_mask.dtype), attention_mask], dim=1)
