"""BitNet b1.58 layers against independent computations (float64 references written out from the paper's formulas)."""

import math

import pytest
import torch
from torch import nn

from microvlm import MicroVLMConfig, MicroVLMForCausalLM
from microvlm.bitnet import (
    BitLinear,
    convert_linear_to_bitlinear,
    pack_ternary,
    quantisation_stats,
    quantise_activations,
    unpack_ternary,
)


def reference_ternary(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values in {−1, 0, 1}, scale = mean|W|) in float64, straight from the absmean definition."""
    scale = weight.double().abs().sum() / weight.numel()
    return torch.clamp(torch.round(weight.double() / scale), -1, 1), scale


def reference_activations(x: torch.Tensor) -> torch.Tensor:
    """8-bit per-token absmax quantisation in float64."""
    absmax = x.double().abs().max(dim=-1, keepdim=True).values
    return torch.clamp(torch.round(x.double() * 127 / absmax), -128, 127) * absmax / 127


def test_weights_are_absmean_ternary():
    torch.manual_seed(0)
    layer = BitLinear(48, 24)
    values, scale = reference_ternary(layer.weight.detach())
    quantised = layer.quantised_weight()
    torch.testing.assert_close(quantised.double(), values * scale)
    ratios = torch.unique(quantised.double() / scale)
    torch.testing.assert_close(ratios, torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))  # all three levels used
    # Weight-only mode: the output is exactly a Linear with W_q.
    layer.activation_bits = None
    x = torch.randn(3, 5, 48)
    expected = x.double() @ (values * scale).T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_scale_is_clamped_for_an_all_zero_weight():
    layer = BitLinear(4, 2, bias=False)
    nn.init.zeros_(layer.weight)
    out = layer(torch.randn(3, 4))
    assert torch.isfinite(out).all() and (out == 0).all()


def test_activation_quantisation_is_on_the_grid_and_bounded_per_token():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 32) * torch.logspace(-3, 2, 7).view(1, 7, 1)  # tokens of very different magnitudes
    quantised = quantise_activations(x)
    absmax = x.abs().amax(-1, keepdim=True)
    assert ((quantised - x).abs() <= absmax / 254 * (1 + 1e-5)).all()
    steps = quantised.double() * 127 / absmax.double()
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)  # integer multiples of absmax/127
    torch.testing.assert_close(quantised.double(), reference_activations(x), rtol=1e-6, atol=1e-7)
    assert quantise_activations(x.bfloat16()).dtype == torch.bfloat16


def test_forward_with_both_quantisers_matches_the_reference():
    torch.manual_seed(0)
    layer = BitLinear(32, 16)
    x = torch.randn(4, 6, 32)
    values, scale = reference_ternary(layer.weight.detach())
    expected = reference_activations(x) @ (values * scale).T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_straight_through_gradients_equal_a_linear_with_the_quantised_weight_and_input():
    torch.manual_seed(0)
    layer = BitLinear(12, 6)
    x = torch.randn(4, 12, requires_grad=True)
    target = torch.randn(4, 6)
    (layer(x) - target).pow(2).sum().backward()

    # Independent: a plain Linear whose weight and input are the quantised ones, both leaves.
    values, scale = reference_ternary(layer.weight.detach())
    weight_q = (values * scale).float().requires_grad_(True)
    x_q = reference_activations(x.detach()).float().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    (x_q @ weight_q.T + bias - target).pow(2).sum().backward()

    torch.testing.assert_close(layer.weight.grad, weight_q.grad)
    torch.testing.assert_close(layer.bias.grad, bias.grad)
    torch.testing.assert_close(x.grad, x_q.grad)


def test_a_bitlinear_regression_learns():
    torch.manual_seed(0)
    teacher = torch.randint(-1, 2, (4, 16)).float() * 0.5  # representable by a ternary layer
    layer = BitLinear(16, 4, bias=False)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 16)
    y = x @ teacher.T
    losses = []
    for _ in range(300):
        loss = (layer(x) - y).pow(2).mean()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.05 * losses[0]


def make_tree() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "projection": nn.Linear(8, 8),
            "scope_net": nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8, bias=False)),
            "scope_net_head": nn.Linear(8, 8),  # shares a string prefix with scope_net but is another module
            "other": nn.Sequential(nn.Linear(8, 8)),
        }
    )


def test_conversion_replaces_the_named_layers_and_keeps_their_parameters():
    tree = make_tree()
    original = {name: child for name, child in tree.named_modules() if isinstance(child, nn.Linear)}
    references = {name: (reference_ternary(child.weight.detach()), child.bias) for name, child in original.items()}
    frozen_weight = tree["projection"].weight
    frozen_weight.requires_grad_(False)

    assert convert_linear_to_bitlinear(tree, names=["projection", "scope_net"]) == 3
    converted = {name for name, child in tree.named_modules() if isinstance(child, BitLinear)}
    assert converted == {"projection", "scope_net.0", "scope_net.2"}
    assert type(tree["scope_net_head"]) is nn.Linear and type(tree["other"][0]) is nn.Linear
    assert tree["projection"].weight is frozen_weight and not tree["projection"].weight.requires_grad

    x = torch.randn(5, 8)
    for name in converted:
        (values, scale), bias = references[name]
        layer = tree.get_submodule(name)
        inputs = torch.randn(5, layer.in_features)
        expected = reference_activations(inputs) @ (values * scale).T
        if bias is not None:
            expected = expected + bias.double()
        torch.testing.assert_close(layer(inputs).double(), expected, rtol=1e-5, atol=1e-5)
    hidden = tree["scope_net"](x)
    assert hidden.shape == (5, 8) and torch.isfinite(hidden).all()

    assert convert_linear_to_bitlinear(tree, names=["projection"]) == 0  # already converted
    assert convert_linear_to_bitlinear(tree) == 2  # the rest
    with pytest.raises(ValueError, match="scopenet"):
        convert_linear_to_bitlinear(tree, names=["scopenet"])


def test_conversion_of_the_memory_projection_and_scope_net():
    torch.manual_seed(0)
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny"))
    memory = model.model.memory
    assert convert_linear_to_bitlinear(memory, names=["projection", "scope_net"]) == 1 + 3  # W_M, ScopeNet's 3
    assert isinstance(memory.projection.proj, BitLinear)
    assert quantisation_stats(model)["bitnet/layers"] == 4
    codes = torch.randn(3, memory.encoder.code_dim)
    assert memory.scope_net(codes).shape == (3,)


def test_config_switch_builds_bitnet_memory_layers_that_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny", memory_use_bitnet=True))
    assert isinstance(model.model.memory.projection.proj, BitLinear)
    assert isinstance(model.model.memory.scope_net.net[0], BitLinear)
    model.save_pretrained(tmp_path)
    loaded = MicroVLMForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.model.memory.projection.proj, BitLinear)
    torch.testing.assert_close(loaded.model.memory.projection.proj.weight, model.model.memory.projection.proj.weight)


@pytest.mark.parametrize("shape", [(7, 13), (8, 4), (5,), (3, 2, 3), (1, 6)])
def test_packing_is_transformers_bitnet_layout_and_round_trips_exactly(shape):
    from transformers.integrations.bitnet import pack_weights  # the independent reference layout

    torch.manual_seed(0)
    weight = torch.randn(shape)
    packed, inverse_scale = pack_ternary(weight)
    values, reference_scale = reference_ternary(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(shape[0] / 4), *shape[1:])
    assert torch.equal(packed, pack_weights(values.float().clone()))
    assert inverse_scale.shape == (1,) and float(inverse_scale) == pytest.approx(1 / float(reference_scale), rel=1e-6)
    unpacked = unpack_ternary(packed, inverse_scale, shape[0])
    assert unpacked.dtype == torch.float32 and unpacked.shape == shape
    assert torch.equal(unpacked * inverse_scale, values.float())  # the ternary values, bit for bit
    if len(shape) == 2:
        layer = BitLinear(shape[1], shape[0])
        layer.weight.data.copy_(weight)
        assert torch.equal(unpacked, layer.quantised_weight())


def test_packed_bytes_by_hand():
    # Rows 0..4 of a (5, 1) weight, R = 2: byte 0 holds rows 0, 2, 4 (codes at bits 0, 2, 4), byte 1 rows 1, 3.
    weight = torch.tensor([[1.0], [-1.0], [0.0], [1.0], [-1.0]])
    packed, _ = pack_ternary(weight)
    assert packed.flatten().tolist() == [2 | (1 << 2) | (0 << 4), 0 | (2 << 2)]


def test_unpacking_rejects_bytes_of_the_wrong_size():
    packed, inverse_scale = pack_ternary(torch.randn(10, 3))
    with pytest.raises(ValueError, match="expected uint8 bytes of 3 rows"):
        unpack_ternary(packed[:2], inverse_scale, 10)


def test_stats_keys_and_ranges():
    torch.manual_seed(0)
    tree = make_tree()
    assert quantisation_stats(tree) == {}  # nothing to report before conversion
    convert_linear_to_bitlinear(tree)
    tree["projection"].weight.data = torch.tensor([[2.0, -2.0, 0.1, 0.0]]).repeat(8, 2)  # known layer
    stats = quantisation_stats(tree, per_layer=True)

    aggregate = {"weight_rel_error", "zero_fraction", "plus_fraction", "minus_fraction", "scale"}
    layers = ["projection", "scope_net.0", "scope_net.2", "scope_net_head", "other.0"]
    assert set(stats) == {f"bitnet/{key}" for key in aggregate} | {"bitnet/layers"} | {
        f"bitnet/{layer}/{key}" for layer in layers for key in aggregate
    }
    assert stats["bitnet/layers"] == 5
    for prefix in ["bitnet"] + [f"bitnet/{layer}" for layer in layers]:
        assert 0 <= stats[f"{prefix}/weight_rel_error"] <= 1 and stats[f"{prefix}/scale"] > 0
        fractions = [stats[f"{prefix}/{key}"] for key in ("zero_fraction", "plus_fraction", "minus_fraction")]
        assert all(0 <= f <= 1 for f in fractions) and sum(fractions) == pytest.approx(1)

    # The known layer: s = 1.025, W_q = [s, −s, 0, 0] per block of 4.
    s = (2 + 2 + 0.1) / 4
    assert stats["bitnet/projection/scale"] == pytest.approx(s)
    assert stats["bitnet/projection/zero_fraction"] == pytest.approx(0.5)
    assert stats["bitnet/projection/plus_fraction"] == pytest.approx(0.25)
    error = math.sqrt(2 * (2 - s) ** 2 + 0.1**2) / math.sqrt(2 * 2**2 + 0.1**2)
    assert stats["bitnet/projection/weight_rel_error"] == pytest.approx(error, rel=1e-5)
    per_layer_errors = [stats[f"bitnet/{layer}/weight_rel_error"] for layer in layers]
    assert stats["bitnet/weight_rel_error"] == pytest.approx(sum(per_layer_errors) / 5)
