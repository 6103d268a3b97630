"""The native ternary kernel (`microvlm/ternary_kernel.py`) against the float reference, inside exported models, and
its fallback to the PyTorch path."""

import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from microvlm import MicroVLMConfig, MicroVLMForCausalLM, ternary_kernel
from microvlm.bitnet import BitLinear, pack_ternary, quantise_activations, unpack_ternary
from microvlm.export import WeightFormats, write_export
from microvlm.packed_weights import (
    Float16Weight,
    Int4Weight,
    Int8Weight,
    PackedBitLinear,
    PackedEmbedding,
    PackedLinear,
    TiedLMHead,
    store_packed,
)
from microvlm.ternary_kernel import load_ternary_kernel, packed_linear, ternary_kernel_disabled, ternary_linear

from .conftest import make_inputs


@pytest.fixture
def kernel():
    built = load_ternary_kernel()
    if built is None:
        pytest.skip("the native ternary kernel could not be built here (see the warning); the fallback is tested")
    return built


def reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, rows: int, bias, bits: int):
    """Unpacked ternary W_q times the int8-quantised activations, in float64."""
    weight = unpack_ternary(packed, scale, rows).double()
    y = quantise_activations(x, bits).double() @ weight.T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize(
    ("shape", "rows", "bias", "bits"),
    [
        ((1, 896), 10, True, 8),  # one token, a row count that is not a multiple of 4
        ((2, 3, 37), 5, False, 8),  # batch × sequence, columns that are not a multiple of 32
        ((5, 2100), 13, True, 8),  # several int16 blocks of 1024 columns plus a tail; an odd token count
        ((130, 70), 9, True, 4),  # more tokens than a 64-token block, 4-bit activations
    ],
)
def test_kernel_equals_the_reference_within_float_rounding(kernel, shape, rows, bias, bits):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3
    x[0, ...] = 0  # an all-zero token: the absmax clamps at eps
    packed, scale = pack_ternary(torch.randn(rows, shape[-1]))
    b = torch.randn(rows) if bias else None
    y = ternary_linear(x, packed, rows, scale, b, bits)
    expected = reference(x, packed, scale, rows, b, bits)
    assert y.shape == (*shape[:-1], rows) and y.dtype == torch.float32
    # The integer dot product is exact; three float32 operations remain (scale, 1 / g, bias).
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_kernel_keeps_bfloat16_and_rejects_a_bad_packed_shape(kernel):
    torch.manual_seed(0)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    packed, scale = pack_ternary(torch.randn(8, 64))
    y = ternary_linear(x, packed, 8, scale, None, 8)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference(x.float(), packed, scale, 8, None, 8), rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match=r"ceil\(out_features / 4\)"):
        kernel(x.float(), packed, 20, scale, None, 8)


def test_packed_layer_uses_the_kernel_only_where_it_applies(kernel):
    torch.manual_seed(0)
    layer = PackedBitLinear.from_bitlinear(BitLinear(48, 11))
    x = torch.randn(2, 4, 48)
    with ternary_kernel_disabled():
        fallback = layer(x)
    torch.testing.assert_close(layer(x), fallback, rtol=1e-5, atol=1e-5)
    assert ternary_linear(x.requires_grad_(), layer.weight, 11, layer.weight_scale, None, 8) is None
    assert ternary_linear(x, layer.weight, 11, layer.weight_scale, None, None) is None


def test_an_unbuildable_kernel_warns_once_and_falls_back(monkeypatch, caplog):
    def no_compiler() -> None:
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(ternary_kernel, "_state", {})
    monkeypatch.setattr(ternary_kernel, "build_kernel", no_compiler)
    torch.manual_seed(0)
    bitlinear = BitLinear(32, 6).eval()
    layer, x = PackedBitLinear.from_bitlinear(bitlinear), torch.randn(3, 32)
    with caplog.at_level(logging.WARNING, logger=ternary_kernel.__name__):
        first, second = layer(x), layer(x)
    assert [record.message.count("pip install ninja") for record in caplog.records] == [1]
    assert torch.equal(first, bitlinear(x)) and torch.equal(second, first)


@torch.no_grad()
def test_exported_model_generates_the_same_tokens_with_and_without_the_kernel(kernel, tmp_path):
    torch.manual_seed(0)
    config = MicroVLMConfig.from_preset("tiny", lm_use_bitnet=True, memory_use_bitnet=True, use_memory=True)
    model = MicroVLMForCausalLM(config).eval()
    packed = write_export(copy.deepcopy(model), None, tmp_path, WeightFormats()).eval()
    assert (tmp_path / "ternary_kernel.py").is_file()  # shipped with the remote code
    inputs = make_inputs(config, [5, 3])
    with_kernel = packed.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with ternary_kernel_disabled():
        without = packed.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        logits = packed(**inputs).logits
    assert torch.equal(with_kernel, without)
    torch.testing.assert_close(packed(**inputs).logits, logits, rtol=0, atol=1e-2)


def packed_forms(shape: tuple[int, int], group_size: int) -> list:
    return [Int8Weight(torch.float32), Int4Weight(torch.float32, shape, group_size)]


def head_reference(x: torch.Tensor, form: Float16Weight, stored: tuple) -> torch.Tensor:
    """The dequantised weights times the int8-quantised activations, in float64."""
    return quantise_activations(x, 8).double() @ form(*stored).double().T


@pytest.mark.parametrize(
    ("rows", "cols", "group_size", "tokens"),
    [
        (37, 128, 64, 1),  # whole 64-element chunks (the AVX2 path), one token
        (19, 192, 128, 6),  # groups of two chunks, every other one spanning two rows; 4 tokens plus a tail of 2
        (13, 100, 20, 5),  # columns and groups that are not multiples of 64 (the portable path)
        (9, 72, 48, 3),  # groups that span two rows (portable path)
        (11, 320, 64, 3),  # groups of 64 whose rows are not a multiple of 128 columns
        (7, 64, 64, 70),  # more tokens than a 64-token block
    ],
)
def test_packed_head_kernel_equals_the_quantised_reference(kernel, rows, cols, group_size, tokens):
    torch.manual_seed(0)
    weight = torch.randn(rows, cols) * torch.logspace(-2, 1, rows).view(rows, 1)
    x = torch.randn(tokens, cols) * torch.logspace(-1, 1, tokens).view(tokens, 1)
    x[-1] = 0  # an all-zero token: the absmax clamps at eps
    for form in packed_forms((rows, cols), group_size):
        stored = form.right_inverse(weight)
        expected = head_reference(x, form, stored)
        y = packed_linear(x, *stored, rows, 8 if type(form) is Int8Weight else 4, group_size)
        assert y.shape == (tokens, rows) and y.dtype == torch.float32
        # The integer sums are exact; float32 rounding remains in the group scales' sum and the token scale.
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_packed_head_uses_the_kernel_only_where_it_applies_and_falls_back_to_the_same_result(kernel):
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 128)
    head = nn.Linear(128, 50, bias=True)
    x = torch.randn(2, 3, 128)
    for form in packed_forms((50, 128), 64):
        tied = PackedEmbedding.from_embedding(copy.deepcopy(embedding))
        untied = PackedLinear.from_linear(copy.deepcopy(head))
        store_packed(tied, "weight", copy.deepcopy(form))
        store_packed(untied, "weight", copy.deepcopy(form))
        for layer, bias in ((TiedLMHead(tied), None), (untied, untied.bias)):
            weight = (tied if bias is None else untied).weight  # dequantised
            expected = nn.functional.linear(quantise_activations(x, 8), weight, bias)
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
            with ternary_kernel_disabled():
                assert torch.equal(layer(x), expected)  # the fallback: the same maths in float
    codes, scales = Int8Weight(torch.float32).right_inverse(head.weight)
    assert packed_linear(x.requires_grad_(), codes, scales, 50, bits=8) is None
    # float16 weights have no kernel and keep float activations
    weight16 = head.weight.half()
    assert torch.equal(Float16Weight(torch.float32).linear(x, weight16), nn.functional.linear(x, weight16.float()))


@pytest.mark.parametrize("form", ["fp16", "int8", "int4", "int4 groups across rows"])
def test_packed_embedding_dequantises_only_the_rows_it_reads(form, monkeypatch):
    torch.manual_seed(0)
    embedding = nn.Embedding(40, 96)
    parametrization = {
        "fp16": Float16Weight(torch.float32),
        "int8": Int8Weight(torch.float32),
        "int4": Int4Weight(torch.float32, (40, 96), 32),
        "int4 groups across rows": Int4Weight(torch.float32, (40, 96), 64),
    }[form]
    packed = PackedEmbedding.from_embedding(embedding)
    store_packed(packed, "weight", parametrization)
    ids = torch.tensor([[3, 0, 39], [3, 7, 7]])
    expected = nn.functional.embedding(ids, packed.weight)  # rows of the whole dequantised matrix
    if form != "int4 groups across rows":  # rows are whole groups: the lookup never dequantises the whole matrix

        def whole_matrix(*stored):
            raise AssertionError("the lookup dequantised the whole matrix")

        monkeypatch.setattr(parametrization, "forward", whole_matrix)
    assert torch.equal(packed(ids), expected)


PORTABLE = """
import sys, torch
from microvlm import ternary_kernel
assert "-mavx2" not in ternary_kernel.kernel_flags()
cases = torch.load(sys.argv[1])
outputs = [ternary_kernel.ternary_linear(*cases["ternary"])]
outputs += [ternary_kernel.packed_linear(*case) for case in cases["packed"]]
torch.save(outputs, sys.argv[2])
"""


def test_portable_build_equals_the_references(kernel, tmp_path):
    """The scalar C++ (what a CPU without AVX2 compiles), forced by MICROVLM_TERNARY_KERNEL=portable in a fresh
    process (one extension per process): same references as the AVX2 build, on shapes the AVX2 build vectorises."""
    torch.manual_seed(0)
    x = torch.randn(5, 2112)
    packed, scale = pack_ternary(torch.randn(13, 2112))
    bias = torch.randn(13)
    weight, head_x = torch.randn(19, 192), torch.randn(6, 192)
    forms = packed_forms((19, 192), 64)
    stored = [form.right_inverse(weight) for form in forms]
    cases = {
        "ternary": (x, packed, 13, scale, bias, 8),
        "packed": [(head_x, *stored[0], 19, 8, 0), (head_x, *stored[1], 19, 4, 64)],
    }
    torch.save(cases, tmp_path / "cases.pt")
    env = {**os.environ, ternary_kernel.ENVIRONMENT_SWITCH: "portable"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", PORTABLE, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ternary, *heads = torch.load(tmp_path / "out.pt")
    expected = reference(x, packed, scale, 13, bias, 8)
    torch.testing.assert_close(ternary.double(), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    for form, values, y in zip(forms, stored, heads, strict=True):
        expected = head_reference(head_x, form, values)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
