"""BitNet b1.58 layers against independent computations."""

import math

import torch
from torch import nn

from microvlm import MicroVLMConfig, MicroVLMForCausalLM
from microvlm.bitnet import (BitLinear, convert_linear_to_bitlinear, pack_ternary, quantisation_stats,
                             quantise_activations, unpack_ternary)


def test_weights_are_absmean_ternary():
    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    scale = layer.weight.abs().mean()
    expected = torch.clamp(torch.round(layer.weight / scale), -1, 1) * scale
    torch.testing.assert_close(layer.quantised_weight(), expected)
    assert set(torch.unique(layer.quantised_weight() / scale).round().tolist()) <= {-1.0, 0.0, 1.0}


def test_activation_quantisation_error_is_bounded_per_token():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 32) * 3
    error = (quantise_activations(x) - x).abs()
    bound = x.abs().amax(-1, keepdim=True) / 254 + 1e-6  # half a step of absmax/127
    assert (error <= bound).all()


def test_straight_through_gradient_equals_a_linear_with_the_quantised_weight():
    torch.manual_seed(0)
    layer = BitLinear(12, 6, activation_bits=None)
    x = torch.randn(4, 12)
    layer(x).pow(2).sum().backward()
    reference_weight = layer.quantised_weight().detach().requires_grad_(True)
    nn.functional.linear(x, reference_weight, layer.bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, reference_weight.grad)


def test_a_bitlinear_regression_learns():
    torch.manual_seed(0)
    target = nn.Linear(16, 4)
    layer = BitLinear(16, 4)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 16)
    y = target(x).detach()
    first = None
    for _ in range(300):
        loss = (layer(x) - y).pow(2).mean()
        first = first if first is not None else float(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.3 * first


def test_conversion_of_the_memory_projection_and_scope_net():
    torch.manual_seed(0)
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny"))
    memory = model.model.memory
    codes = torch.randn(3, memory.config.text_config.hidden_size)
    count = convert_linear_to_bitlinear(memory, names=["projection", "scope_net"])
    assert count == 1 + 3  # W_M and ScopeNet's three layers
    assert isinstance(memory.projection.proj, BitLinear)
    stats = quantisation_stats(model)
    assert stats["bitnet/layers"] == 4 and 0 < stats["bitnet/weight_rel_error"] < 1 and 0 < stats["bitnet/zero_fraction"] < 1
    assert memory.scope_net(codes).shape == (3,)


def test_packing_round_trips_at_two_bits_per_weight():
    torch.manual_seed(0)
    weight = torch.randn(7, 13)
    packed, scale, shape = pack_ternary(weight)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(weight.numel() / 4)
    layer = BitLinear(13, 7)
    layer.weight.data.copy_(weight)
    torch.testing.assert_close(unpack_ternary(packed, scale, shape), layer.quantised_weight())


def test_config_switch_builds_bitnet_memory_layers_that_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny", memory_use_bitnet=True))
    assert isinstance(model.model.memory.projection.proj, BitLinear)
    assert isinstance(model.model.memory.scope_net.net[0], BitLinear)
    model.save_pretrained(tmp_path)
    loaded = MicroVLMForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.model.memory.projection.proj, BitLinear)
    torch.testing.assert_close(loaded.model.memory.projection.proj.weight, model.model.memory.projection.proj.weight)
