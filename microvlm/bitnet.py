"""BitNet b1.58 (Ma et al., 2024, "The Era of 1-bit LLMs") linear layers: ternary weights, 8-bit activations,
straight-through gradients.

Forward, in training and at inference, for a layer with latent full-precision weight W (out, in):
    g   = 1 / max(mean|W|, eps)                                                (inverse absmean scale, one per layer)
    W_q = clamp(round(W · g), −1, 1) / g                                       (ternary {−1, 0, +1} / g)
    a   = max(max_j |x_j|, eps) over each token's features                     (absmax, one per token)
    x_q = clamp(round(x · Q_b / a), −Q_b − 1, Q_b) · a / Q_b,  Q_b = 2^(bits−1) − 1 = 127 for 8 bits
    y   = x_q W_qᵀ + b
g is transformers' BitNet `weight_scale` convention (`integrations/bitnet.py`: y = (x_int W_tᵀ) / (g · 127 / a)).
Both quantisers use the straight-through estimator with a quantisation strength λ ∈ [0, 1] (`BitLinear.strength`):
the forward value is lerp(x, q(x), λ) — x at λ = 0, exactly q(x) at λ = 1 — while the backward pass treats the
blend as the identity, so at λ = 1 the latent weights receive exactly the gradient a plain Linear holding W_q
(applied to x_q) would give its weight. Raising λ from 0 to 1 over the first steps of quantisation-aware training
(`set_quantisation_strength`) keeps a pretrained model from being erased by full quantisation at step 0.
Per element, |x_q − x| ≤ a / (2 Q_b) = a / 254.

The layer norm that the paper places before the activation quantiser is left to the surrounding model.

`pack_ternary` stores the ternary values at 2 bits each (4 per byte) in transformers' BitNet layout plus g: a layer
with an (out, in) weight takes ceil(out / 4) · in bytes + one float32 on disk, against 4 · out · in in float32.

This module is shipped as Hugging Face remote code, so it depends on torch only.
"""

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn


logger = logging.getLogger(__name__)

EPS = 1e-5
# The linear layers of a Qwen2/Llama-style decoder that BitNet b1.58 makes ternary (embedding and LM head stay).
LANGUAGE_MODEL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def ternary_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternarisation of a weight, computed in float32.

    Args:
        weight (`torch.Tensor` of any shape): latent full-precision weight W.

    Returns:
        `(values, inverse_scale)`: float32 `values` of W's shape with entries in {−1, 0, 1}, and the float32
        scalar g = 1 / max(mean|W|, eps), so that W_q = values / g.
    """
    weight = weight.float()
    inverse_scale = 1 / weight.abs().mean().clamp(min=EPS)
    return (weight * inverse_scale).round().clamp(-1, 1), inverse_scale


def straight_through(latent: torch.Tensor, quantised: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Forward value lerp(latent, quantised, λ = `strength`) — `latent` at λ = 0 and exactly `quantised` at λ = 1
    (torch.lerp is exact at both ends) — with the identity as gradient to `latent` and none to `quantised`."""
    return torch.lerp(latent.detach(), quantised.detach().to(latent.dtype), strength) + (latent - latent.detach())


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

    `strength` (λ, defaults to 1) blends the full-precision forward (0) into the quantised one (1); it is not
    saved (a loaded model is fully quantised) and is set during training by `set_quantisation_strength`.
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
        self.strength = 1.0

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
        """W_q (out, in) = clamp(round(W · g), −1, 1) / g in the weight's dtype, without a gradient path."""
        values, inverse_scale = ternary_weight(self.weight)
        return (values / inverse_scale).to(self.weight.dtype).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) → y (..., out_features) = x_q W_qᵀ + b at λ = 1 (each operand blended with its
        full-precision value below 1); straight-through gradients to x and W."""
        weight = straight_through(self.weight, self.quantised_weight(), self.strength)
        if self.activation_bits is not None:
            x = straight_through(x, quantise_activations(x, self.activation_bits), self.strength)
        return nn.functional.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ternary weights, activation_bits={self.activation_bits}"


def set_quantisation_strength(module: nn.Module, strength: float) -> int:
    """Set λ (`BitLinear.strength`, in [0, 1]) of every BitLinear under `module`; returns how many were set."""
    if not 0 <= strength <= 1:
        raise ValueError(f"set_quantisation_strength: λ must lie in [0, 1], got {strength}")
    layers = [layer for layer in module.modules() if isinstance(layer, BitLinear)]
    for layer in layers:
        layer.strength = strength
    return len(layers)


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


def convert_language_model_to_bitlinear(language_model: nn.Module, activation_bits: int | None = 8) -> int:
    """`convert_linear_to_bitlinear` on the `LANGUAGE_MODEL_PROJECTIONS` layers of a decoder; returns the count."""
    names = [
        name for name, _ in language_model.named_modules() if name.rpartition(".")[2] in LANGUAGE_MODEL_PROJECTIONS
    ]
    return convert_linear_to_bitlinear(language_model, names, activation_bits)


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
            values, inverse_scale = ternary_weight(layer.weight)
            weight = layer.weight.float()
            per_layer_rows[name] = {
                "weight_rel_error": float((weight - values / inverse_scale).norm() / weight.norm().clamp(min=EPS)),
                "zero_fraction": float((values == 0).float().mean()),
                "plus_fraction": float((values == 1).float().mean()),
                "minus_fraction": float((values == -1).float().mean()),
                "scale": float(1 / inverse_scale),
            }
    if not per_layer_rows:
        return {}
    rows = list(per_layer_rows.values())
    stats = {f"bitnet/{key}": sum(row[key] for row in rows) / len(rows) for key in rows[0]}
    stats["bitnet/layers"] = float(len(rows))
    if per_layer:
        stats.update({f"bitnet/{name}/{key}": v for name, row in per_layer_rows.items() for key, v in row.items()})
    return stats


def pack_ternary(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean-ternarise `weight` and pack its values at 2 bits each, in transformers' BitNet layout.

    Layout (transformers' `integrations.bitnet.pack_weights`): with d₀ = weight.shape[0] and R = ceil(d₀ / 4), the
    value t ∈ {−1, 0, 1} at index (r, c…) is stored as the code t + 1 ∈ {0, 1, 2} in bits 2k .. 2k + 1 of byte
    (r mod R, c…), k = ⌊r / R⌋: byte (j, c…) holds rows j, j + R, j + 2R, j + 3R of column c…, lowest bits first;
    bits of rows ≥ d₀ are zero. For an (out, in) weight each packed row is contiguous over `in`, so a kernel reads
    one activation vector against four output rows per byte.

    Args:
        weight (`torch.Tensor` of shape (d₀, …)): latent full-precision weight.

    Returns:
        `(packed, inverse_scale)`: uint8 `packed` of shape (R, …) on weight's device and the float32 tensor g of
        shape (1,) (transformers' `weight_scale`): W_q = values / g.
    """
    values, inverse_scale = ternary_weight(weight)
    rows = values.shape[0]
    codes = (values + 1).to(torch.uint8)
    codes = torch.cat([codes, codes.new_zeros(-rows % 4, *codes.shape[1:])]).view(4, -1, *codes.shape[1:])
    packed = codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)
    return packed, inverse_scale.reshape(1)


def ternary_codes(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """The uint8 codes t + 1 ∈ {0, 1, 2} (3 in a corrupt byte) of shape (rows, …) held by `pack_ternary`'s bytes.

    Raises:
        `ValueError`: if `packed` is not uint8 with ceil(rows / 4) rows.
    """
    if packed.dtype != torch.uint8 or packed.dim() == 0 or packed.shape[0] != math.ceil(rows / 4):
        raise ValueError(
            f"unpack_ternary: expected uint8 bytes of {math.ceil(rows / 4)} rows for {rows} rows, "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    return torch.cat([(packed >> shift) & 3 for shift in (0, 2, 4, 6)])[:rows]


def unpack_ternary(packed: torch.Tensor, inverse_scale: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of `pack_ternary`: the float32 W_q = values / g with `rows` rows (exactly BitLinear's W_q in float32).

    Raises:
        `ValueError`: if `packed` is not uint8 with ceil(rows / 4) rows.
    """
    return (ternary_codes(packed, rows).float() - 1) / inverse_scale.float()


def latent_from_packed(packed: torch.Tensor, inverse_scale: torch.Tensor, rows: int) -> torch.Tensor:
    """Latent float32 weights (rows, …) that `ternary_weight` turns back into exactly the packed W_q = t / g.

    A packed checkpoint (transformers' BitNet quantizer: uint8 `weight` + `weight_scale` g) has lost its latent
    weights. With f = mean|t| (the fraction of non-zero codes), W = t / (g·f) has mean|W| = 1/g, so absmean
    ternarisation gives round(t / f) clamped = t (f ≤ 1) and the same g: a `BitLinear` holding W computes what
    the packed layer computes. Training from W starts every weight on the ternary grid (prefer master weights).
    """
    values = ternary_codes(packed, rows).float() - 1
    return values / (inverse_scale.float() * values.abs().mean().clamp(min=EPS))


def master_state_dict(language_model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a language model loaded from a packed BitNet checkpoint (projections holding a uint8
    `weight` (⌈out/4⌉, in) and a `weight_scale`), in `nn.Linear` form: each packed weight becomes
    `latent_from_packed`'s (out, in) latent weight and the scales are dropped. Other tensors are kept."""
    state = {}
    for name, tensor in language_model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        module = language_model.get_submodule(module_name) if module_name else language_model
        packed = getattr(module, "weight", None)
        if packed is not None and packed.dtype == torch.uint8 and hasattr(module, "weight_scale"):
            if leaf == "weight":
                state[name] = latent_from_packed(packed, module.weight_scale, module.out_features)
            continue  # weight_scale: folded into the latent weight
        state[name] = tensor
    return state
