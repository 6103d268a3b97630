"""BitNet b1.58 (Ma et al., 2024, "The Era of 1-bit LLMs") linear layers: ternary weights, 8-bit activations,
straight-through gradients.

Forward, in training and at inference, for a layer with latent full-precision weight W (out, in):
    s   = max(mean|W|, eps)                                                    (absmean scale, one per layer)
    W_q = clamp(round(W / s), −1, 1) · s                                       (ternary {−1, 0, +1} · s)
    a   = max(max_j |x_j|, eps) over each token's features                     (absmax, one per token)
    x_q = clamp(round(x · Q_b / a), −Q_b − 1, Q_b) · a / Q_b,  Q_b = 2^(bits−1) − 1 = 127 for 8 bits
    y   = x_q W_qᵀ + b
Both quantisers use the straight-through estimator, x + (q(x) − x).detach(): the forward value is q(x) while the
backward pass treats q as the identity, so the latent weights receive exactly the gradient a plain Linear holding
W_q (applied to x_q) would give its weight. Per element, |x_q − x| ≤ a / (2 Q_b) = a / 254.

The layer norm that the paper places before the activation quantiser is left to the surrounding model.

`pack_ternary` stores the ternary values at 2 bits each (4 per byte) plus one float scale: a layer with n weights
takes ceil(n / 4) bytes + one float32 scale on disk, against 4n bytes in float32.

This module is shipped as Hugging Face remote code, so it depends on torch only.
"""

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn


logger = logging.getLogger(__name__)

EPS = 1e-5


def ternary_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternarisation of a weight, computed in float32.

    Args:
        weight (`torch.Tensor` of any shape): latent full-precision weight W.

    Returns:
        `(values, scale)`: float32 `values` of W's shape with entries in {−1, 0, 1}, and the float32 scalar
        `scale` s = max(mean|W|, eps), so that W_q = values · s.
    """
    weight = weight.float()
    scale = weight.abs().mean().clamp(min=EPS)
    return (weight / scale).round().clamp(-1, 1), scale


def quantise_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-token absmax quantisation to `bits` bits, returned dequantised (no gradient path of its own).

    Args:
        x (`torch.Tensor` of shape `(..., features)`): activations; each slice along the last dim is one token.
        bits (`int`): bit width b; the integer grid is [−Q_b − 1, Q_b] with Q_b = 2^(b−1) − 1.

    Returns:
        `torch.Tensor` of x's shape and dtype: clamp(round(x · Q_b / a), −Q_b − 1, Q_b) · a / Q_b with a the
        token's max |x| (clamped ≥ eps); scales and rounding are computed in float32.
    """
    levels = 2 ** (bits - 1) - 1
    x32 = x.float()
    absmax = x32.abs().amax(-1, keepdim=True).clamp(min=EPS)
    return ((x32 * levels / absmax).round().clamp(-levels - 1, levels) * absmax / levels).to(x.dtype)


class BitLinear(nn.Linear):
    """`nn.Linear` with BitNet b1.58 ternary weights and (optionally) per-token quantised activations.

    The stored parameters (`weight` (out, in), `bias` (out,)) are the latent full-precision ones, with the same
    names and shapes as `nn.Linear`, so checkpoints load either way; only the forward pass differs.

    Args:
        in_features, out_features, bias, device, dtype: as for `nn.Linear`.
        activation_bits (`int` or `None`, defaults to 8): bit width of the absmax activation quantiser; `None`
            keeps activations in full precision (weight-only ternary quantisation).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        activation_bits: int | None = 8,
    ):
        if activation_bits is not None and activation_bits < 2:
            raise ValueError(f"activation_bits must be None or an integer ≥ 2, got {activation_bits}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation_bits = activation_bits

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation_bits: int | None = 8) -> "BitLinear":
        """A BitLinear sharing `linear`'s parameter objects (same values, `requires_grad`, optimizer identity)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
            activation_bits=activation_bits,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer.train(linear.training)

    def quantised_weight(self) -> torch.Tensor:
        """W_q (out, in) = clamp(round(W / s), −1, 1) · s in the weight's dtype, without a gradient path."""
        values, scale = ternary_weight(self.weight)
        return (values * scale).to(self.weight.dtype).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) → y (..., out_features) = x_q W_qᵀ + b; straight-through gradients to x and W."""
        weight = self.weight + (self.quantised_weight() - self.weight).detach()
        if self.activation_bits is not None:
            x = x + (quantise_activations(x, self.activation_bits) - x).detach()
        return nn.functional.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ternary weights, activation_bits={self.activation_bits}"


def convert_linear_to_bitlinear(
    module: nn.Module, names: Iterable[str] | None = None, activation_bits: int | None = 8
) -> int:
    """Replace, in place, the `nn.Linear` layers under `module` by BitLinear layers holding the same parameters.

    Args:
        module (`nn.Module`): root of the tree to convert (it is not replaced itself).
        names (`Iterable[str]`, *optional*): qualified-name prefixes relative to `module`, matched on whole
            components: "scope_net" selects "scope_net" and "scope_net.net.0", not "scope_net_head". `None`
            converts every `nn.Linear`.
        activation_bits (`int` or `None`): passed to each BitLinear.

    Returns:
        `int`: how many layers were replaced (0 on a second call: BitLinear layers are left as they are).

    Raises:
        `ValueError`: if a prefix names no submodule of `module` (most likely a typo in the caller).
    """
    named = dict(module.named_modules())
    prefixes = None if names is None else [name.rstrip(".") for name in names]

    def selected(name: str) -> bool:
        return prefixes is None or any(name == p or name.startswith(p + ".") for p in prefixes)

    for prefix in prefixes or []:
        if not any(name == prefix or name.startswith(prefix + ".") for name in named):
            raise ValueError(f"convert_linear_to_bitlinear: {type(module).__name__} has no submodule {prefix!r}")
    # Exact type, not isinstance: BitLinear is itself a Linear, and subclasses such as MultiheadAttention's
    # out_proj are called through functional code that never runs their forward.
    targets = [name for name, child in named.items() if name and type(child) is nn.Linear and selected(name)]
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child_name, BitLinear.from_linear(named[name], activation_bits=activation_bits))
    if targets:
        logger.info("BitNet b1.58: %d Linear layers converted to BitLinear", len(targets))
    return len(targets)


@torch.no_grad()
def quantisation_stats(module: nn.Module, per_layer: bool = False) -> dict[str, float]:
    """Weight-quantisation statistics of the BitLinear layers under `module`, for the training logs.

    Keys (each a mean over the layers, every layer weighing the same):
        `bitnet/weight_rel_error`: ‖W − W_q‖_F / ‖W‖_F, in [0, 1] for absmean (≈ 0.5 for Gaussian weights);
            its drift shows whether the latent weights settle near the ternary grid.
        `bitnet/zero_fraction`, `bitnet/plus_fraction`, `bitnet/minus_fraction`: fractions of the ternary
            values equal to 0, +1 and −1 (they sum to 1); a zero fraction heading to 1 means a dying layer.
        `bitnet/scale`: the absmean scale s.
        `bitnet/layers`: the number of BitLinear layers.
    With `per_layer=True`, also `bitnet/<qualified name>/<stat>` for each layer and each stat above but `layers`.
    Returns an empty dict when the tree holds no BitLinear, so callers can always merge it into their logs.
    """
    per_layer_rows: dict[str, dict[str, float]] = {}
    for name, layer in module.named_modules():
        if isinstance(layer, BitLinear):
            values, scale = ternary_weight(layer.weight)
            weight = layer.weight.float()
            per_layer_rows[name] = {
                "weight_rel_error": float((weight - values * scale).norm() / weight.norm().clamp(min=EPS)),
                "zero_fraction": float((values == 0).float().mean()),
                "plus_fraction": float((values == 1).float().mean()),
                "minus_fraction": float((values == -1).float().mean()),
                "scale": float(scale),
            }
    if not per_layer_rows:
        return {}
    rows = list(per_layer_rows.values())
    stats = {f"bitnet/{key}": sum(row[key] for row in rows) / len(rows) for key in rows[0]}
    stats["bitnet/layers"] = float(len(rows))
    if per_layer:
        stats.update({f"bitnet/{name}/{key}": v for name, row in per_layer_rows.items() for key, v in row.items()})
    return stats


def pack_ternary(weight: torch.Tensor) -> tuple[torch.Tensor, float, tuple[int, ...]]:
    """Absmean-ternarise `weight` and pack its values at 2 bits each.

    Layout: the flattened (row-major) value t_i ∈ {−1, 0, 1} is stored as the code t_i + 1 ∈ {0, 1, 2} in bits
    2·(i mod 4) .. 2·(i mod 4) + 1 of byte ⌊i / 4⌋; the last byte is zero-padded.

    Args:
        weight (`torch.Tensor` of any shape, n elements): latent full-precision weight.

    Returns:
        `(packed, scale, shape)`: `packed` a uint8 tensor of shape (ceil(n / 4),) on weight's device, `scale` the
        absmean scale s as a Python float (exactly the float32 value), `shape` the weight's shape.
    """
    values, scale = ternary_weight(weight)
    codes = (values.flatten() + 1).to(torch.uint8)
    codes = torch.cat([codes, codes.new_zeros(-codes.numel() % 4)]).view(-1, 4)
    packed = codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)
    return packed, float(scale), tuple(weight.shape)


def unpack_ternary(packed: torch.Tensor, scale: float, shape: Iterable[int]) -> torch.Tensor:
    """Inverse of `pack_ternary`: the float32 W_q = values · scale of `shape` (exactly BitLinear's W_q in float32).

    Raises:
        `ValueError`: if `packed` is not a uint8 tensor of ceil(prod(shape) / 4) bytes.
    """
    shape = tuple(shape)
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != math.ceil(n / 4):
        raise ValueError(
            f"unpack_ternary: expected {math.ceil(n / 4)} uint8 bytes for shape {shape}, "
            f"got {packed.numel()} of {packed.dtype}"
        )
    codes = torch.stack([(packed.flatten() >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1).flatten()[:n]
    if (codes == 3).any():
        raise ValueError("unpack_ternary: code 3 found; the bytes were not written by pack_ternary")
    return (codes.float() - 1).view(shape) * torch.tensor(scale, dtype=torch.float32, device=packed.device)
