"""MicroVLM's episodic memory module: the Larimar memory, ScopeNet and W_M, plus the memory written at inference.

Codes in, per-layer key/values out: `read` turns pooled contexts (B, C) into (key, value) pairs shaped like the
language model's GQA cache, an attention mask for those memory columns, ScopeNet's gate and the KL terms.
"""

import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import ModelOutput

from .bitnet import convert_linear_to_bitlinear
from .configuration_microvlm import MicroVLMConfig
from .larimar_memory import LarimarMemory, MemoryState
from .memory_injection import MemoryKVProjection, ScopeNet

MEMORY_STATE_FILE = "memory_state.safetensors"


@dataclass
class MemoryRead(ModelOutput):
    """One read for a batch: per-layer `key_values` ((B, kv_heads, n_mem, head_dim) pairs), the memory columns'
    attention `mask` (B, n_mem), ScopeNet's `gate` (B,), and the KL terms (scalars)."""

    key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    mask: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    memory_kl: torch.Tensor | None = None
    addressing_kl: torch.Tensor | None = None


class MicroVLMEpisodicMemory(nn.Module):
    """Larimar memory (`larimar`), W_M (`projection`) and ScopeNet (`scope_net`), sized from the config.

    `state` is the memory written by `write` (None: nothing written); reads without an explicit state use it.
    """

    def __init__(self, config: MicroVLMConfig):
        super().__init__()
        text = config.text_config
        hidden = text.hidden_size
        self.config = config  # read at call time: the scope threshold may be changed on a loaded model
        self.larimar = LarimarMemory(
            num_slots=config.memory_num_slots,
            code_dim=hidden,
            observation_noise_std=config.memory_observation_noise_std,
            pinv_method=config.memory_pinv_method,
            pinv_steps=config.memory_pinv_steps,
            use_lstm=config.memory_use_lstm,
        )
        self.projection = MemoryKVProjection(
            code_dim=hidden,
            num_layers=text.num_hidden_layers,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or hidden // text.num_attention_heads,
            tokens_per_read=config.memory_tokens_per_read,
        )
        self.scope_net = ScopeNet(hidden, config.scope_hidden_size)
        if config.memory_use_bitnet:  # BitNet b1.58 ternary W_M and ScopeNet (same parameter names)
            convert_linear_to_bitlinear(self, names=["projection", "scope_net"])
        self.state: MemoryState | None = None

    def write_episodes(self, codes: torch.Tensor, weight: float | torch.Tensor = 1.0) -> MemoryState:
        """Write codes (E, B, C) — one episode per batch row — into fresh memories (the learned prior)."""
        return self.larimar.write(codes, self.larimar.prior(codes.shape[1]), weight=weight)

    def read(self, codes: torch.Tensor, state: MemoryState | None = None) -> MemoryRead:
        """Read codes (B, C) from `state`, else from the written memory, else from each row's own code written
        alone (Larimar's auto-encoding read; a row never depends on its neighbours).

        In training ScopeNet gates softly (the memory's values are scaled by the gate, so the LM loss trains it);
        at inference rows whose gate is below `scope_threshold` get their memory columns masked: exactly the
        logits of a model without memory.
        """
        batch = codes.shape[0]
        state = state if state is not None else self.state
        if state is None:
            state = self.larimar.write(codes.unsqueeze(0), self.larimar.prior(batch))
        readout, kl_terms = self.larimar.read(codes.unsqueeze(0), self._broadcast(state, batch))
        gate = self.scope_net(codes)
        key_values = self.projection(readout[0].unsqueeze(1).to(codes.dtype))
        num_tokens = key_values[0][0].shape[2]
        if self.training:
            soft = gate.to(codes.dtype).view(-1, 1, 1, 1)
            key_values = tuple((key, value * soft) for key, value in key_values)
            mask = torch.ones(batch, num_tokens, dtype=torch.long, device=codes.device)
        else:
            mask = (gate >= self.config.scope_threshold).long().unsqueeze(1).expand(-1, num_tokens)
        return MemoryRead(key_values=key_values, mask=mask, gate=gate, **kl_terms)

    @staticmethod
    def _broadcast(state: MemoryState, batch: int) -> MemoryState:
        if state.mean.shape[0] == batch:
            return state
        if state.mean.shape[0] != 1:
            raise ValueError(f"MicroVLM memory holds {state.mean.shape[0]} episodes but the batch has {batch} rows")
        return MemoryState(state.mean.expand(batch, -1, -1), state.cov.expand(batch, -1, -1))

    # ------------------------------------------------------------------ the memory written at inference

    @property
    def current_state(self) -> MemoryState:
        """The written memory (M (1, K, C), Σ (1, K, K)), or the learned prior when nothing was written."""
        return self.state if self.state is not None else self.larimar.prior(1)

    @torch.no_grad()
    def write(self, codes: torch.Tensor, weight: float = 1.0) -> MemoryState:
        """Append one episode, codes (E, C) in order, to the written memory."""
        self.state = self.larimar.write(codes.unsqueeze(1), self.current_state, weight=weight)
        return self.state

    def reset(self) -> None:
        self.state = None

    def save(self, directory: str | os.PathLike) -> None:
        state = self.current_state
        save_file({"mean": state.mean.contiguous(), "cov": state.cov.contiguous()}, os.path.join(directory, MEMORY_STATE_FILE))

    def load(self, directory: str | os.PathLike) -> None:
        path = os.path.join(directory, MEMORY_STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No episodic memory in {directory}: expected {MEMORY_STATE_FILE}")
        tensors = load_file(path, device=str(self.larimar.prior_mean.device))
        self.state = MemoryState(tensors["mean"], tensors["cov"])
