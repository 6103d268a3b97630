"""1.58-bit path: λ warm-up, the quantized training stage, packed storage against independent references, and the
exported folder loaded by its remote code in a fresh offline process."""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from microvlm import MicroVLMConfig, MicroVLMForCausalLM, MicroVLMProcessor
from microvlm.bitnet import BitLinear, set_quantisation_strength
from microvlm.export import WeightFormats, write_export
from microvlm.export.vocabulary import coverage, kept_token_ids, trim_embedding, trim_tokenizer
from microvlm.packed_weights import Int4Weight, Int8Weight, PackedBitLinear
from microvlm.ternary_kernel import load_ternary_kernel, ternary_kernel_disabled
from microvlm.train.callbacks import QuantisationWarmupCallback
from microvlm.train.cli import main

from .conftest import make_inputs
from .test_bitnet import reference_activations, reference_ternary
from .test_remote_code import run_isolated
from .test_training import SMALL, logged


EXACT = WeightFormats(embedding="fp32", vision="fp32", rest="fp32")  # lossless but for the ternary body

LOADER = """
import sys, torch
sys.modules["microvlm"] = None  # the folder's own code only
from transformers import AutoModelForCausalLM
folder, inputs_file, result_file = sys.argv[1:4]
inputs = torch.load(inputs_file)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(**inputs).logits
generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
body = type(model.model.language_model.layers[0].mlp.up_proj).__name__
kernel = hasattr(torch.ops.microvlm_ternary, "linear")  # the folder's ternary_kernel.py built and ran it
torch.save({"logits": logits, "generated": generated, "body": body, "kernel": kernel}, result_file)
"""


def qat_model() -> MicroVLMForCausalLM:
    torch.manual_seed(0)
    config = MicroVLMConfig.from_preset("tiny", lm_use_bitnet=True, memory_use_bitnet=True, use_memory=True)
    return MicroVLMForCausalLM(config).eval()


def test_strength_zero_is_the_full_precision_layer_and_one_the_ternary_layer():
    torch.manual_seed(0)
    layer = BitLinear(24, 8)
    plain = nn.Linear(24, 8)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 24)
    set_quantisation_strength(layer, 0.0)
    assert torch.equal(layer(x), plain(x))
    set_quantisation_strength(layer, 1.0)
    values, scale = reference_ternary(layer.weight.detach())
    expected = reference_activations(x) @ (values * scale).T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        set_quantisation_strength(layer, 1.5)


def test_blended_gradient_is_straight_through():
    torch.manual_seed(0)
    layer = BitLinear(12, 6)
    layer.strength = 0.3
    x = torch.randn(4, 12, requires_grad=True)
    target = torch.randn(4, 6)
    (layer(x) - target).pow(2).sum().backward()
    # Independent: a plain linear on the blended weight and input, both leaves: 0.7·full + 0.3·quantised.
    values, scale = reference_ternary(layer.weight.detach())
    weight = (0.7 * layer.weight.detach().double() + 0.3 * values * scale).float().requires_grad_(True)
    x_blend = (0.7 * x.detach().double() + 0.3 * reference_activations(x.detach())).float().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    (x_blend @ weight.T + bias - target).pow(2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x_blend.grad, rtol=1e-4, atol=1e-5)


def test_warmup_callback_raises_strength_linearly_to_one():
    model = qat_model()
    callback = QuantisationWarmupCallback(warmup_steps=4)
    seen = []
    for step in (0, 2, 4, 9):
        callback.on_step_begin(None, type("State", (), {"global_step": step}), None, model=model)
        seen.append({layer.strength for layer in model.modules() if isinstance(layer, BitLinear)})
    assert seen == [{0.0}, {0.5}, {1.0}, {1.0}]


def test_quantized_stage_trains_ternary_layers_with_warmup_and_saves_them(tmp_path):
    (output,) = main(
        [
            "--stage",
            "quantized",
            "--recipe",
            "demo",
            "--max_steps",
            "4",
            "--bitnet_warmup_steps",
            "2",
            "--output_dir",
            str(tmp_path),
            *SMALL,
            "--eval_strategy",
            "no",
        ]
    )
    entries = [entry for entry in logged(Path(output)) if "lm_loss" in entry]
    assert [entry["bitnet/strength"] for entry in entries] == [0.5, 1.0]
    assert all(entry["bitnet/layers"] == 4 * 7 + 1 + 3 for entry in entries)  # LM body, W_M, ScopeNet
    config = json.loads((Path(output) / "config.json").read_text())
    assert config["lm_use_bitnet"] and config["memory_use_bitnet"]
    loaded = MicroVLMForCausalLM.from_pretrained(output)
    assert isinstance(loaded.model.language_model.layers[0].self_attn.q_proj, BitLinear)


def reference_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group-wise symmetric absmax int4 in float64 (scale rounded to float16, as stored; all-zero groups stay 0)."""
    groups = weight.double().flatten().view(-1, group_size)
    scale = (groups.abs().max(-1, keepdim=True).values.float() / 7).half().double()
    return (torch.clamp(torch.round(torch.nan_to_num(groups / scale)), -7, 7) * scale).view(weight.shape)


def test_int4_and_int8_storage_against_references():
    torch.manual_seed(0)
    weight = torch.randn(6, 32) * torch.logspace(-2, 1, 6).view(6, 1)
    int4 = Int4Weight(torch.float32, tuple(weight.shape), group_size=16)
    codes, scales = int4.right_inverse(weight)
    assert codes.dtype == torch.uint8 and codes.numel() == weight.numel() // 2 and scales.dtype == torch.float16
    torch.testing.assert_close(int4(codes, scales).double(), reference_int4(weight, 16), rtol=1e-6, atol=1e-7)
    int8 = Int8Weight(torch.float32)
    codes, scales = int8.right_inverse(weight)
    row_scale = weight.double().abs().max(-1, keepdim=True).values / 127
    expected = torch.clamp(torch.round(weight.double() / row_scale), -127, 127) * row_scale
    assert codes.dtype == torch.int8
    torch.testing.assert_close(int8(codes, scales).double(), expected, rtol=1e-6, atol=1e-7)


def test_packed_layer_is_bit_for_bit_its_bitlinear():
    torch.manual_seed(0)
    layer = BitLinear(40, 10).eval()
    packed = PackedBitLinear.from_bitlinear(layer)
    assert packed.weight.shape == (3, 40) and packed.weight.dtype == torch.uint8
    x = torch.randn(2, 7, 40)
    with ternary_kernel_disabled():  # the native kernel is equal up to float rounding (test_ternary_kernel.py)
        assert torch.equal(packed(x), layer(x))


def export_and_load(model, formats: WeightFormats, tmp_path: Path) -> tuple[dict, MicroVLMForCausalLM, dict]:
    inputs = make_inputs(model.config, [5, 3])
    folder, elsewhere = tmp_path / "export", tmp_path / "elsewhere"
    elsewhere.mkdir()
    packed = write_export(copy.deepcopy(model), MicroVLMProcessor.from_preset("tiny"), folder, formats)
    torch.save(inputs, tmp_path / "inputs.pt")
    run_isolated(LOADER, str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "result.pt"), cwd=elsewhere)
    return torch.load(tmp_path / "result.pt"), packed.eval(), inputs


@torch.no_grad()
def test_ternary_export_loads_offline_and_equals_the_qat_model(tmp_path):
    model = qat_model()
    result, _, inputs = export_and_load(model, EXACT, tmp_path)
    assert result["body"] == "PackedBitLinear" and result["kernel"] == (load_ternary_kernel() is not None)
    # The loaded model runs the native kernel: float rounding can move an int8 activation code by one step.
    torch.testing.assert_close(result["logits"], model(**inputs).logits, rtol=0, atol=1e-2)
    expected = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(result["generated"], expected)


@torch.no_grad()
def test_default_export_is_smaller_and_loads_what_was_packed(tmp_path):
    model = qat_model()
    result, packed, inputs = export_and_load(model, WeightFormats(), tmp_path)
    assert torch.equal(result["logits"], packed(**inputs).logits)
    embedding = packed.get_input_embeddings().weight
    torch.testing.assert_close(
        embedding.double(), reference_int4(model.get_input_embeddings().weight.detach(), 64), rtol=1e-6, atol=1e-7
    )
    weights = (tmp_path / "export" / "model.safetensors").stat().st_size
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    assert weights < fp32 / 4


def test_truncated_or_corrupt_packed_file_fails_naming_the_tensor(tmp_path):
    write_export(qat_model(), None, tmp_path, WeightFormats())
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    from safetensors import safe_open

    with safe_open(weights, "pt") as file:
        names = list(file.keys())
    weights.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"truncated: tensor '[\w.]+'"):
        MicroVLMForCausalLM.from_pretrained(tmp_path)

    from safetensors.torch import load_file, save_file

    weights.write_bytes(data)
    tensors = load_file(weights)
    name = "model.language_model.layers.1.mlp.down_proj.weight"
    assert name in names and tensors[name].dtype == torch.uint8
    tensors[name][0, 0] = 0xFF
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{name} holds the code 3"):
        MicroVLMForCausalLM.from_pretrained(tmp_path)


@torch.no_grad()
def test_vocabulary_trimming_keeps_encodings_of_kept_text_and_the_logits_of_kept_tokens(tiny_model, tiny_config):
    tokenizer = MicroVLMProcessor.from_preset("tiny").tokenizer
    texts = ["three yellow diamonds on the right", "what colour are the shapes?", "one red circle"]
    keep = kept_token_ids(tokenizer, texts, 48)
    assert {0, 1, 2, 3} <= set(keep) and len(keep) >= 48
    trimmed = trim_tokenizer(tokenizer, keep)
    assert len(trimmed) == len(keep)
    for text in texts:
        before, after = tokenizer(text)["input_ids"], trimmed(text)["input_ids"]
        assert [keep[index] for index in after] == before  # same tokens, renumbered
    assert coverage(tokenizer, trimmed, texts) == {"without_unknowns": 1.0, "same_tokens": 1.0}

    model = copy.deepcopy(tiny_model)
    trim_embedding(model, keep)
    assert model.config.image_token_id == keep.index(tiny_config.image_token_id)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    inputs = make_inputs(tiny_config, [4, 2])
    ids = inputs["input_ids"] % len(keep)
    original = tiny_model(**{**inputs, "input_ids": torch.tensor(keep)[ids]}).logits
    renumbered = {**inputs, "input_ids": torch.where(ids == keep.index(3), model.config.image_token_id, ids)}
    torch.testing.assert_close(model(**renumbered).logits, original[..., keep])


def test_export_cli_with_vocabulary_trimming_writes_a_consistent_folder(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoProcessor

    from microvlm.export.__main__ import main as export

    tiny_model.save_pretrained(tmp_path / "trained")
    MicroVLMProcessor.from_preset("tiny").save_pretrained(tmp_path / "trained")
    corpus = ["one red circle on the left", "two blue squares", "what colour are the shapes?", " red"] * 5
    (tmp_path / "corpus.txt").write_text("\n".join(corpus))
    export(
        [
            "--model_dir",
            str(tmp_path / "trained"),
            "--output_dir",
            str(tmp_path / "out"),
            "--keep_vocab",
            "40",
            "--corpus_file",
            str(tmp_path / "corpus.txt"),
        ]
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "out", trust_remote_code=True)
    vocab = model.config.text_config.vocab_size
    assert vocab == len(processor.tokenizer) < 2048 and model.config.weight_formats["lm_body"] == "ternary"
    assert processor.image_token_id == model.config.image_token_id
    inputs = processor(images=[torch.zeros(64, 64, 3).numpy()], text=["what colour are the shapes?"])
    tokens = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 3 and int(tokens.max()) < vocab


def test_fidelity_table_gives_points_from_the_reference_and_marks_the_goal():
    from microvlm.export.fidelity import fidelity_table

    def results(attributes: float, qa: float) -> dict:
        captions = {"attributes": {"mean": attributes}, "attributes_held_out_pairs": {"mean": 0.5}}
        return {
            "captions": {"model": captions},
            "qa": {"model": qa},
            "recall": {"memory": 0.8},
            "retrieval": {"model": {"image_to_text_r@1": 0.9}},
        }

    table = fidelity_table({"fp": results(0.90, 0.80), "qat": results(0.87, 0.70)})
    assert "| caption attributes, mean | 90.0% | 87.0% (-3.0) |" in table
    assert "| question exact match | 80.0% | 70.0% (-10.0 ✗) |" in table
