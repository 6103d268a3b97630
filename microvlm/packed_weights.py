"""Packed storage of an exported MicroVLM (`python -m microvlm.export`): what the saved folder's remote code
rebuilds before transformers loads the packed tensors.

`config.weight_formats` = {"lm_body": f, "embedding": f, "vision": f, "rest": f, "group_size": G, "tied_lm_head": t}
names the form of each component's matrices (every floating parameter with ≥ 2 dims; biases, norms and scalars
stay float32):

* "ternary" (LM body only): every `BitLinear` becomes a `PackedBitLinear`, whose buffers are transformers' BitNet
  tensors: `weight` uint8 (ceil(out / 4), in) in `bitnet.pack_ternary`'s layout, `weight_scale` float32 (1,) = g
  with W_q = values / g, and `bias`. BitLinear layers elsewhere (W_M, ScopeNet under `memory_use_bitnet`) are
  packed the same way whatever their component's format: ternary is their exact form.
* "int8": per row (dim 0) symmetric absmax, `original0` int8 codes q = round(W / s) ∈ [−127, 127] and `original1`
  float32 scales s = max|W_row| / 127 of shape (d₀, 1, …): 1 byte per weight.
* "int4": groups of G consecutive elements of the flattened tensor (rows of an (out, in) matrix when G divides
  in), symmetric absmax with s = max|W_group| / 7 in float16, codes q + 8 ∈ [1, 15] packed two per byte, element
  2i in the low nibble: 0.5 + 2 / G bytes per weight.
* "fp16": float16 copies (2 bytes per weight); "fp32": unchanged.

The int8/int4/fp16 forms are `torch.nn.utils.parametrize` parametrizations: the module keeps its code and reads a
float32 weight dequantised on access (state-dict keys `<module>.parametrizations.<name>.original0/1`), so any
parameter — a conv kernel, `nn.MultiheadAttention.in_proj_weight`, the memory prior — can be stored packed.
A quantised embedding that the LM head was tied to ("tied_lm_head": true; the config then says
`tie_word_embeddings=False`, since transformers cannot tie to a parametrized weight) is read by `TiedLMHead`, so it
is stored once. A packed embedding is a `PackedEmbedding`, whose lookup dequantises only the rows it reads. An LM head
stored int8 or int4 (`TiedLMHead`, or `PackedLinear` when untied) quantises its input per token to int8
(`bitnet.quantise_activations`, as every ternary layer does) and computes logits = x_q · W_deqᵀ: on the CPU by the
native int8/int4 × int8 kernel (`ternary_kernel.packed_linear`) on the stored codes, so the vocab × hidden matrix
is never dequantised whole at inference; elsewhere (or without the kernel) as that float product. Its logits thus
carry the int8 activation rounding, like every ternary layer's outputs (`benchmarks/head_activation_rounding.py`
measures the effect).

This module is shipped as Hugging Face remote code: it depends on torch and the other shipped modules only.
"""

import json
import math
import os
import struct
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from .bitnet import BitLinear, pack_ternary, quantise_activations, ternary_codes, unpack_ternary
from .ternary_kernel import packed_linear, ternary_linear


COMPONENT_FORMATS = {
    "lm_body": ("ternary", "fp32", "fp16", "int8", "int4"),
    "embedding": ("fp32", "fp16", "int8", "int4"),
    "vision": ("fp32", "fp16", "int8", "int4"),
    "rest": ("fp32", "fp16", "int8", "int4"),
}
FLOAT16_TINY = torch.finfo(torch.float16).tiny
HEAD_ACTIVATION_BITS = 8  # an int8/int4 LM head's activations, the bits its native kernel computes with


class PackedBitLinear(nn.Module):
    """A BitLinear frozen into its exported form: 2-bit ternary weights + g, per-token quantised activations.

    y = quantise_activations(x) · (values / g)ᵀ + b: the output of the `BitLinear` it was packed from. Weights stay
    packed in memory. On the CPU the native kernel (`ternary_kernel.py`) computes it in integers (equal up to float
    rounding); elsewhere, or without the kernel, the weights are unpacked at each call (pure PyTorch, bit for bit).

    Args:
        in_features, out_features (`int`), bias (`bool`): as for `nn.Linear`.
        activation_bits (`int` or `None`): as for `BitLinear`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation_bits: int | None = 8):
        super().__init__()
        self.in_features, self.out_features, self.activation_bits = in_features, out_features, activation_bits
        self.register_buffer("weight", torch.zeros(math.ceil(out_features / 4), in_features, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(1))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_bitlinear(cls, layer: BitLinear) -> "PackedBitLinear":
        """The packed form of `layer` (on its device): its ternary values, g and a float32 copy of its bias."""
        packed = cls(layer.in_features, layer.out_features, layer.bias is not None, layer.activation_bits)
        packed.weight, packed.weight_scale = pack_ternary(layer.weight)
        if layer.bias is not None:
            packed.bias = layer.bias.detach().float().clone()
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) → (..., out_features)."""
        y = ternary_linear(x, self.weight, self.out_features, self.weight_scale, self.bias, self.activation_bits)
        if y is not None:
            return y
        weight = unpack_ternary(self.weight, self.weight_scale, self.out_features).to(x.dtype)
        if self.activation_bits is not None:
            x = quantise_activations(x, self.activation_bits)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, packed ternary, "
            f"activation_bits={self.activation_bits}"
        )


class Float16Weight(nn.Module):
    """Parametrization: stored float16, read as `dtype`."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor]:
        return (weight.detach().half(),)

    def rows(self, index: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """Rows `index` (n,) of the weight (d₀, …) → (n, …): what `forward(...)[index]` gives, reading those rows."""
        return stored[index].to(self.dtype)

    def linear(self, x: torch.Tensor, *stored: torch.Tensor) -> torch.Tensor:
        """The output x (..., in) → (..., out) of a linear layer whose weight (out, in) is stored in this form:
        float16 weights read as float, x Wᵀ."""
        return nn.functional.linear(x, self(*stored).to(x.dtype))


def quantised_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x_q Wᵀ for x (..., in) and W (out, in), x_q = `quantise_activations(x, HEAD_ACTIVATION_BITS)`: what the
    native int8/int4 head kernel computes, in float (its fallback)."""
    return nn.functional.linear(quantise_activations(x, HEAD_ACTIVATION_BITS), weight.to(x.dtype))


class Int8Weight(Float16Weight):
    """Parametrization: per-row (dim 0) symmetric absmax int8, W ≈ q · s (module docstring)."""

    def forward(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return self.values(codes, scales)

    def values(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Rows of codes (n, …) int8 with their scales (n, 1, …) → weights q · s (n, …)."""
        return (codes.float() * scales).to(self.dtype)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = weight.detach().float()
        scales = weight.abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True) / 127
        codes = (weight / scales.clamp(min=FLOAT16_TINY)).round().clamp(-127, 127)
        return codes.to(torch.int8), scales

    def rows(self, index: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return self.values(codes[index], scales[index])

    def linear(self, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """x_q Wᵀ with x quantised per token to int8 (`quantised_linear`): the native int8 × int8 kernel where it
        applies, else in float on the dequantised W."""
        y = packed_linear(x, codes, scales, codes.shape[0], bits=8) if codes.dim() == 2 else None
        return y if y is not None else quantised_linear(x, self(codes, scales))


class Int4Weight(Float16Weight):
    """Parametrization: symmetric absmax int4 over groups of `group_size` elements of the flattened weight of
    `shape`, two codes per byte (module docstring)."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], group_size: int):
        super().__init__(dtype)
        if group_size < 2 or group_size % 2:
            raise ValueError(f"Int4Weight: group_size must be an even number ≥ 2, got {group_size}")
        self.shape, self.group_size = tuple(shape), group_size

    def forward(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        values = self.groups(codes.view(-1, self.group_size // 2), scales)
        return values.flatten()[: math.prod(self.shape)].view(self.shape).to(self.dtype)

    @staticmethod
    def groups(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Packed groups (..., G / 2) uint8 with scales (..., 1) → float32 values (..., G), element 2i from the low
        nibble of byte i: (code − 8) · s."""
        nibbles = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)
        return (nibbles.float() - 8) * scales.float()

    def rows(self, index: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Rows `index` of a matrix whose rows are whole groups: only those groups are unpacked."""
        if len(self.shape) != 2 or self.shape[1] % self.group_size:
            return super().rows(index, self(codes, scales))
        rows = self.shape[0]
        values = self.groups(codes.view(rows, -1, self.group_size // 2)[index], scales.view(rows, -1, 1)[index])
        return values.flatten(-2).to(self.dtype)

    def linear(self, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """x_q Wᵀ with x quantised per token to int8 (`quantised_linear`): the native int4 × int8 kernel where it
        applies, else in float on the dequantised W."""
        applies = len(self.shape) == 2
        y = packed_linear(x, codes, scales, self.shape[0], 4, self.group_size) if applies else None
        return y if y is not None else quantised_linear(x, self(codes, scales))

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = weight.detach().float().flatten()
        groups = torch.cat([flat, flat.new_zeros(-flat.numel() % self.group_size)]).view(-1, self.group_size)
        scales = (groups.abs().amax(-1, keepdim=True) / 7).half()
        codes = ((groups / scales.float().clamp(min=FLOAT16_TINY)).round().clamp(-7, 7) + 8).to(torch.uint8)
        pairs = codes.view(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4), scales


def stored_weight(module: nn.Module) -> tuple[Float16Weight, tuple[torch.Tensor, ...]] | None:
    """(parametrization, stored tensors) of `module.weight` when it is stored in one of the packed forms above."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    parametrizations = module.parametrizations.weight
    if len(parametrizations) != 1 or not isinstance(parametrizations[0], Float16Weight):
        return None
    stored = tuple(getattr(parametrizations, f"original{i}") for i in range(parametrizations.ntensors))
    return parametrizations[0], stored


def packed_matmul(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """x (..., in) → (..., out) through `module.weight` W (out, in) in its stored form (`Float16Weight.linear`:
    int8/int4 quantise x to int8 and run the native kernel where it applies), or x Wᵀ when W is not packed."""
    stored = stored_weight(module)
    return (
        stored[0].linear(x, *stored[1]) if stored is not None else nn.functional.linear(x, module.weight.to(x.dtype))
    )


class PackedEmbedding(nn.Embedding):
    """`nn.Embedding` whose packed weight (int8/int4/fp16 parametrization) is read row by row: a lookup dequantises
    the rows it reads (`rows`), which equal the same rows of the whole dequantised matrix, instead of all of them."""

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "PackedEmbedding":
        """The same embedding (its weight Parameter shared), before its parametrization is registered."""
        packed = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, device="meta")
        packed.weight = embedding.weight
        return packed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (...) → (..., dim)."""
        stored = stored_weight(self)
        if stored is None:
            return super().forward(input_ids)
        form, tensors = stored
        return form.rows(input_ids.flatten(), *tensors).view(*input_ids.shape, self.embedding_dim)


class PackedLinear(nn.Linear):
    """`nn.Linear` (an untied LM head) whose packed weight runs the native kernel where it applies
    (`packed_matmul`)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "PackedLinear":
        """The same layer (its Parameters shared), before its parametrization is registered."""
        packed = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        packed.weight, packed.bias = linear.weight, linear.bias
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = packed_matmul(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class TiedLMHead(nn.Module):
    """LM head tied to a parametrized (quantised) input embedding E (vocab, hidden): logits = h Eᵀ, by the native
    kernel on the packed E where it applies (`packed_matmul`). The embedding is referenced, not registered, so its
    codes are stored once, under the embedding's name."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._embedding = [embedding]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return packed_matmul(hidden, self._embedding[0])


def component_of(name: str) -> str:
    """The `weight_formats` component of a parameter or module of `MicroVLMForCausalLM` named `name`."""
    if name.startswith(("model.language_model.embed_tokens", "lm_head")):
        return "embedding"
    if name.startswith("model.language_model."):
        return "lm_body"
    if name.startswith("model.vision_tower."):
        return "vision"
    return "rest"


def check_weight_formats(formats: dict) -> None:
    """Raise a ValueError naming the component whose format is unknown."""
    for component, allowed in COMPONENT_FORMATS.items():
        if formats.get(component, "fp32") not in allowed:
            raise ValueError(f"weight_formats[{component!r}] must be one of {allowed}, got {formats[component]!r}")


def parametrization_for(weight: torch.Tensor, form: str, group_size: int) -> nn.Module | None:
    if form == "fp16":
        return Float16Weight(weight.dtype)
    if form == "int8":
        return Int8Weight(weight.dtype)
    if form == "int4":
        return Int4Weight(weight.dtype, tuple(weight.shape), group_size)
    return None


def apply_weight_formats(model: nn.Module, formats: dict) -> None:
    """Put `model` (a `MicroVLMForCausalLM`) in the packed form `formats` describes, in place: every BitLinear
    becomes a PackedBitLinear, and each other matrix gets its component's parametrization, which quantises the
    current weights (at export) or only fixes the shapes of the tensors the loader then fills (at load).

    Raises:
        `ValueError`: for an unknown format, or an LM body stored "ternary" that holds plain Linear layers (convert
            it first: `MicroVLMForCausalLM.enable_bitnet`), or stored in another form while it holds BitLinear layers.
    """
    check_weight_formats(formats)
    group_size = int(formats.get("group_size", 64))
    for name, module in list(model.named_modules()):
        if isinstance(module, BitLinear):
            if component_of(name) == "lm_body" and formats.get("lm_body") != "ternary":
                raise ValueError(f"{name} is a BitLinear (ternary by training): export the LM body as 'ternary'")
            model.set_submodule(name, PackedBitLinear.from_bitlinear(module))
    if formats.get("lm_body") == "ternary":
        body = [
            name
            for name, module in model.named_modules()
            if type(module) is nn.Linear and component_of(name) == "lm_body"
        ]
        if body:
            raise ValueError(
                f"weight_formats: LM body stored 'ternary' but {body[0]} is a plain Linear; "
                "call model.enable_bitnet(language_model=True) first (post-training ternarisation)"
            )
    if formats.get("embedding", "fp32") != "fp32":  # read row by row / through the kernel once packed
        if type(model.get_input_embeddings()) is nn.Embedding:
            model.set_input_embeddings(PackedEmbedding.from_embedding(model.get_input_embeddings()))
        if not formats.get("tied_lm_head") and type(model.lm_head) is nn.Linear:
            model.lm_head = PackedLinear.from_linear(model.lm_head)
    if formats.get("tied_lm_head"):
        model.lm_head = TiedLMHead(model.get_input_embeddings())
    for name, module in list(model.named_modules()):
        for parameter_name, parameter in list(module.named_parameters(recurse=False)):
            full_name = f"{name}.{parameter_name}" if name else parameter_name
            if not parameter.is_floating_point() or parameter.dim() < 2:
                continue
            form = parametrization_for(parameter, formats.get(component_of(full_name), "fp32"), group_size)
            if form is not None:
                store_packed(module, parameter_name, form)


def store_packed(module: nn.Module, name: str, form: Float16Weight) -> None:
    """Store `module.<name>` in the packed form `form` (frozen: the codes have no gradient)."""
    getattr(module, name).requires_grad_(False)
    parametrize.register_parametrization(module, name, form, unsafe=True)


def check_safetensors_files(folder: str | os.PathLike) -> None:
    """Check that each `*.safetensors` file in `folder` holds every byte its header promises.

    Raises:
        `ValueError`: naming the file and the first tensor whose bytes are missing (a truncated copy).
    """
    for path in sorted(Path(folder).glob("*.safetensors")):
        size = path.stat().st_size
        with path.open("rb") as file:
            prefix = file.read(8)
            header_size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
            if header_size is None or 8 + header_size > size:
                raise ValueError(f"{path}: truncated before the end of its safetensors header; export it again")
            header = json.loads(file.read(header_size))
        header.pop("__metadata__", None)
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][1]):
            end = 8 + header_size + entry["data_offsets"][1]
            if end > size:
                raise ValueError(
                    f"{path}: truncated: tensor {name!r} ends at byte {end} but the file has {size} "
                    "bytes; copy or export the folder again"
                )


@torch.no_grad()
def check_packed_weights(model: nn.Module) -> None:
    """Check the loaded packed tensors: ternary bytes hold codes 0–2 only and g is finite and positive.

    Raises:
        `ValueError`: naming the first bad tensor.
    """
    for name, module in model.named_modules():
        if isinstance(module, PackedBitLinear):
            if (ternary_codes(module.weight, module.out_features) == 3).any():
                raise ValueError(
                    f"packed ternary tensor {name}.weight holds the code 3, which pack_ternary never "
                    "writes: the file is corrupt; export the model again"
                )
            if not bool(torch.isfinite(module.weight_scale).all() and (module.weight_scale > 0).all()):
                raise ValueError(f"{name}.weight_scale must be finite and > 0, got {module.weight_scale.tolist()}")
