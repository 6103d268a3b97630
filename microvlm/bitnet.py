"""BitNet b1.58 (Ma et al., 2024) linear layers: ternary weights, 8-bit activations, straight-through gradients.

Forward, in training and at inference:
    W_q = clamp(round(W / s), −1, 1) · s,  s = mean|W|            (absmean, per layer)
    x_q = clamp(round(x · 127 / a), −128, 127) · a / 127,  a = max|x| over each token's features   (absmax)
    y   = x_q W_qᵀ + b
Both quantisers use the straight-through estimator, x + (q(x) − x).detach(): the latent full-precision weights
receive the gradient a plain Linear with W_q would give them.

`pack_ternary` stores the ternary weights at 2 bits each (4 per byte) plus one float scale: the honest size of a
BitNet layer on disk is ceil(n/4) bytes + 4, against 4n bytes in float32.
"""

import math
from collections.abc import Iterable

import torch
from torch import nn

EPS = 1e-5


def ternary_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values in {−1, 0, 1}, scale s = mean|W|) of a weight, computed in float32."""
    scale = weight.float().abs().mean().clamp(min=EPS)
    return (weight.float() / scale).round().clamp(-1, 1), scale


def quantise_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-token absmax quantisation of x (..., features) to `bits` bits, returned dequantised in x's dtype."""
    levels = 2 ** (bits - 1) - 1
    absmax = x.float().abs().amax(-1, keepdim=True).clamp(min=EPS)
    return ((x.float() * levels / absmax).round().clamp(-levels - 1, levels) * absmax / levels).to(x.dtype)


class BitLinear(nn.Linear):
    """nn.Linear with BitNet b1.58 ternary weights and (optionally) 8-bit per-token activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation_bits: int | None = 8, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.activation_bits = activation_bits

    def quantised_weight(self) -> torch.Tensor:
        values, scale = ternary_weight(self.weight)
        return (values * scale).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + (self.quantised_weight() - self.weight).detach()
        if self.activation_bits is not None:
            x = x + (quantise_activations(x, self.activation_bits) - x).detach()
        return nn.functional.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ternary weights, activation_bits={self.activation_bits}"


def convert_linear_to_bitlinear(module: nn.Module, names: Iterable[str] | None = None, activation_bits: int | None = 8) -> int:
    """Replace the nn.Linear layers under `module` (those whose qualified name starts with one of `names`, or all)
    by BitLinear layers holding the same weights; returns how many were replaced."""
    prefixes = tuple(names) if names is not None else ("",)
    targets = [
        name for name, child in module.named_modules()
        if type(child) is nn.Linear and name.startswith(prefixes)
    ]
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        old = getattr(parent, child_name)
        new = BitLinear(old.in_features, old.out_features, bias=old.bias is not None, activation_bits=activation_bits,
                        device=old.weight.device, dtype=old.weight.dtype)
        new.load_state_dict(old.state_dict())
        setattr(parent, child_name, new)
    return len(targets)


@torch.no_grad()
def quantisation_stats(module: nn.Module) -> dict[str, float]:
    """Mean over the BitLinear layers under `module` of: `bitnet/weight_rel_error` ‖W − W_q‖/‖W‖,
    `bitnet/zero_fraction` and `bitnet/scale`; plus `bitnet/layers`, their count. Empty without BitLinear."""
    rows = []
    for layer in module.modules():
        if isinstance(layer, BitLinear):
            values, scale = ternary_weight(layer.weight)
            error = (layer.weight.float() - values * scale).norm() / layer.weight.float().norm().clamp(min=EPS)
            rows.append((float(error), float((values == 0).float().mean()), float(scale)))
    if not rows:
        return {}
    mean = lambda i: sum(row[i] for row in rows) / len(rows)  # noqa: E731
    return {"bitnet/weight_rel_error": mean(0), "bitnet/zero_fraction": mean(1), "bitnet/scale": mean(2), "bitnet/layers": float(len(rows))}


def pack_ternary(weight: torch.Tensor) -> tuple[torch.Tensor, float, tuple[int, ...]]:
    """(uint8 tensor of ceil(n/4) bytes, scale, shape): the weight's ternary values at 2 bits each."""
    values, scale = ternary_weight(weight)
    codes = (values.flatten() + 1).to(torch.uint8)  # {-1, 0, 1} → {0, 1, 2}
    codes = torch.cat([codes, codes.new_zeros((-codes.numel()) % 4)]).view(-1, 4)
    packed = codes[:, 0] | codes[:, 1] << 2 | codes[:, 2] << 4 | codes[:, 3] << 6
    return packed, float(scale), tuple(weight.shape)


def unpack_ternary(packed: torch.Tensor, scale: float, shape: tuple[int, ...]) -> torch.Tensor:
    """The dequantised float32 weight W_q of `pack_ternary`'s output."""
    codes = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1).flatten()
    return (codes[: math.prod(shape)].float() - 1).view(shape) * scale
