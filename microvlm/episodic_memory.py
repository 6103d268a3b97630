"""MicroVLM's episodic memory module: the memory encoder, the Larimar memory, ScopeNet and W_M, plus the memory
written at inference.

Embeddings in, per-layer key/values out: `encoder` turns token embeddings into codes (key + value, see
`memory_encoder.py`), `write` stores episodes of codes, `read` turns question codes (B, C) into (key, value) pairs
shaped like the language model's GQA cache, an attention mask for those memory columns, ScopeNet's gate and the
KL terms; `step_loss` is the training signal that teaches a question's key to find the step it asks about.
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
from .memory_encoder import MemoryEncoder
from .memory_injection import MemoryKVProjection, ScopeNet


MEMORY_STATE_FILE = "memory_state.safetensors"


@dataclass
class MemoryRead(ModelOutput):
    """One read for a batch: per-layer `key_values` ((B, kv_heads, n_mem, head_dim) pairs), the memory columns'
    attention `mask` (B, n_mem), ScopeNet's `gate` (B,), the KL terms, the step loss and the reconstruction term
    (scalars, the last two when the batch wrote episodes)."""

    key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    mask: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    memory_kl: torch.Tensor | None = None
    addressing_kl: torch.Tensor | None = None
    step_loss: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None


class MicroVLMEpisodicMemory(nn.Module):
    """Memory encoder (`encoder`), Larimar memory (`larimar`), W_M (`projection`) and ScopeNet (`scope_net`),
    sized from the config. Codes are `memory_key_dim` + 2 × hidden-size wide.

    `state` is the memory written at inference by `append` (None: nothing written); reads without an explicit
    state use it.
    """

    def __init__(self, config: MicroVLMConfig):
        super().__init__()
        text = config.text_config
        hidden = text.hidden_size
        self.config = config  # read at call time: the scope threshold may be changed on a loaded model
        self.encoder = MemoryEncoder(hidden, config.memory_key_dim, config.memory_key_kernel_size)
        code_dim = self.encoder.code_dim
        self.larimar = LarimarMemory(
            num_slots=config.memory_num_slots,
            code_dim=code_dim,
            key_dim=config.memory_key_dim,
            observation_noise_std=config.memory_observation_noise_std,
            pinv_method=config.memory_pinv_method,
            pinv_steps=config.memory_pinv_steps,
            use_lstm=config.memory_use_lstm,
            addressing_log_variance_init=config.memory_addressing_log_variance_init,
        )
        self.projection = MemoryKVProjection(
            code_dim=code_dim,
            num_layers=text.num_hidden_layers,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or hidden // text.num_attention_heads,
            tokens_per_read=config.memory_tokens_per_read,
        )
        self.scope_net = ScopeNet(code_dim, config.scope_hidden_size, num_layers=config.scope_num_layers)
        if config.memory_use_bitnet:
            self.convert_to_bitnet()
        self.state: MemoryState | None = None

    def convert_to_bitnet(self) -> int:
        """BitNet b1.58 ternary W_M and ScopeNet in place (same parameter names); returns the layers converted."""
        return convert_linear_to_bitlinear(self, names=["projection", "scope_net"])

    def write(
        self, codes: torch.Tensor, weight: float | torch.Tensor = 1.0, state: MemoryState | None = None
    ) -> MemoryState:
        """Write codes (E, B, C) — one episode per batch row — on top of `state` (default: fresh memories, the
        learned prior). `weight` (float or (E, B)): 1 writes, 0 skips a step, −1 forgets a step written before."""
        state = self.larimar.prior(codes.shape[1]) if state is None else self._broadcast(state, codes.shape[1])
        return self.larimar.write(codes, state, weight=weight)

    def address(self, codes: torch.Tensor, state: MemoryState) -> torch.Tensor:
        """Addressing weights (E, B, K) with which codes (E, B, C) read `state` (one memory per batch row)."""
        return self.larimar.address(codes, self._broadcast(state, codes.shape[1]))

    def step_loss(
        self, questions: torch.Tensor, steps: torch.Tensor, step_mask: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor | None:
        r"""Addressing loss: cross-entropy over each episode's steps of cos(question key, step key)/τ, τ = 0.1.

        questions (B, C), steps (E, B, C) codes; step_mask (E, B) real steps; target (B,) the asked step, −100 for
        rows that ask none. Keys are centred on the mean of the batch's real step keys first: a direction shared
        by every key would otherwise make every cosine ≈ 1 and the gradient vanish. Returns None when no row asks.
        """
        rows = target >= 0
        if not bool(rows.any()):
            return None
        mask = step_mask.bool().T  # (B, E)
        key_dim = self.config.memory_key_dim
        step_keys = steps[..., :key_dim].transpose(0, 1).float()  # (B, E, d_k)
        centre = step_keys[mask].mean(0)
        step_keys = nn.functional.normalize(step_keys - centre, dim=-1)
        question_keys = nn.functional.normalize(questions[..., :key_dim].float() - centre, dim=-1)
        logits = torch.einsum("bd,bed->be", question_keys, step_keys) / 0.1
        logits = logits.masked_fill(~mask, float("-inf"))
        return nn.functional.cross_entropy(logits[rows], target[rows])

    def reconstruction_loss(
        self, steps: torch.Tensor, step_mask: torch.Tensor, state: MemoryState
    ) -> torch.Tensor | None:
        """Mean over the real steps (step_mask (E, B) > 0) of `LarimarMemory.reconstruction_error` of the step codes
        (E, B, C) written into `state`; None when no row wrote a step."""
        real = step_mask > 0
        if not bool(real.any()):
            return None
        return self.larimar.reconstruction_error(steps, state)[real].mean()

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
            state = self.write(codes.unsqueeze(0))
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
    def append(self, codes: torch.Tensor, weight: float = 1.0) -> MemoryState:
        """Append one episode, codes (E, C) in order, to the written memory."""
        self.state = self.write(codes.unsqueeze(1), weight, self.current_state)
        return self.state

    def reset(self) -> None:
        self.state = None

    def save(self, directory: str | os.PathLike) -> None:
        state = self.current_state
        os.makedirs(directory, exist_ok=True)
        save_file(
            {"mean": state.mean.contiguous(), "cov": state.cov.contiguous()},
            os.path.join(directory, MEMORY_STATE_FILE),
        )

    def load(self, directory: str | os.PathLike) -> None:
        path = os.path.join(directory, MEMORY_STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No episodic memory in {directory}: expected {MEMORY_STATE_FILE}")
        tensors = load_file(path, device=str(self.larimar.prior_mean.device))
        self.state = MemoryState(tensors["mean"], tensors["cov"])
