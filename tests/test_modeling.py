from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    BitNetConfig,
    BitNetForCausalLM,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from microvlm import MicroVLMConfig, MicroVLMForCausalLM
from microvlm.alignment import equal_sequences, info_nce
from microvlm.bitnet import BitLinear, pack_ternary, ternary_weight
from microvlm.vision_adapter import MicroVLMVisionAdapter

from .conftest import make_inputs


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.slow
def test_reference_preset_parameter_counts_match_deit_tiny_and_qwen2_5_0_5b():
    config = MicroVLMConfig.from_preset("microvlm-v")
    with torch.device("meta"):
        model = MicroVLMForCausalLM(config)
        deit_classifier = DeiTForImageClassification(
            DeiTConfig(**{**config.vision_config.to_dict(), "num_labels": 1000})
        )
    # DeiT-Tiny's published 5.7M includes its 1000-class head, which MicroVLM does not use.
    assert round(count(deit_classifier) / 1e6, 1) == 5.7
    assert count(model.model.vision_tower) == count(deit_classifier) - count(deit_classifier.classifier)
    language = count(model.model.language_model) + (0 if model.config.tie_word_embeddings else count(model.lm_head))
    assert round(language / 1e6, 1) == 494.0  # Qwen2.5-0.5B, tied embeddings counted once
    adapter = {name: count(child) for name, child in model.model.adapter.named_children()}
    adapter["queries+positions"] = (
        model.model.adapter.queries.numel() + model.model.adapter.position_embeddings.numel()
    )
    hidden = 896
    assert adapter["input_proj"] == 192 * hidden + hidden
    assert adapter["mlp"] == (hidden * 2 * hidden + 2 * hidden) + (2 * hidden * hidden + hidden)
    assert adapter["pool"] == 4 * hidden * hidden + 4 * hidden
    assert adapter["queries+positions"] == 2 * 25 * hidden
    # The seeds' 3.43M is the adapter without the pooling attention's own projections.
    assert round((count(model.model.adapter) - adapter["pool"]) / 1e6, 2) == 3.43


def test_forward_shapes_and_loss_components(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config, [5, 3])
    out = tiny_model(**inputs, labels=inputs["input_ids"])
    assert out.logits.shape == (*inputs["input_ids"].shape, tiny_config.text_config.vocab_size)
    assert out.image_prefix.shape == (2, tiny_config.num_image_tokens, tiny_config.text_config.hidden_size)
    expected = tiny_config.lm_loss_weight * out.lm_loss + tiny_config.alignment_loss_weight * out.alignment_loss
    torch.testing.assert_close(out.loss, expected)


def test_lm_loss_covers_text_tokens_only(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config, [6, 2])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    out = tiny_model(**inputs, labels=ids.clone())
    # Independent reference: next-token CE averaged over targets that are real, non-placeholder tokens.
    logits, targets = out.logits[:, :-1], ids[:, 1:]
    keep = (targets != tiny_config.image_token_id) & (mask[:, 1:] == 1)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    torch.testing.assert_close(out.lm_loss, per_token[keep.reshape(-1)].mean())
    assert keep.sum() == 6 + 2  # every text token is a target, the first one predicted from the prefix


def test_info_nce_matches_an_independent_loop():
    torch.manual_seed(1)
    images, texts = torch.randn(5, 16), torch.randn(5, 16)
    tau = 0.07
    loss, logits = info_nce(images, texts, torch.tensor(1 / tau))
    reference = 0.0
    for i in range(5):
        sims_i2t = [F.cosine_similarity(images[i], texts[j], dim=0) / tau for j in range(5)]
        sims_t2i = [F.cosine_similarity(texts[i], images[j], dim=0) / tau for j in range(5)]
        reference += -sims_i2t[i] + torch.logsumexp(torch.stack(sims_i2t), 0)
        reference += -sims_t2i[i] + torch.logsumexp(torch.stack(sims_t2i), 0)
    torch.testing.assert_close(loss, reference / 10, rtol=1e-5, atol=1e-5)
    assert logits.shape == (5, 5)


# The tiny preset with a DeiT tower, as microvlm-v has: a CLS token, its own position embeddings.
DEIT_TINY = {
    "vision_config": {
        "model_type": "deit",
        "image_size": 64,
        "patch_size": 8,
        "hidden_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 3,
        "intermediate_size": 384,
    },
    "vision_tower_kwargs": {"add_pooling_layer": False},
    "vision_cls_token": True,
    "vision_num_patches": None,
    "adapter_patch_positions": False,
    "alignment_image_source": "cls",
}


def test_alignment_loss_uses_projected_cls_and_mean_of_real_text_tokens():
    config = MicroVLMConfig.from_preset("tiny", **DEIT_TINY)
    torch.manual_seed(0)
    model = MicroVLMForCausalLM(config).eval()
    inputs = make_inputs(config, [4, 7, 2])
    out = model(**inputs, labels=inputs["input_ids"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    cls = model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0]
    embeds = model.get_input_embeddings()(ids)
    texts = torch.stack([embeds[r][(mask[r] == 1) & (ids[r] != config.image_token_id)].mean(0) for r in range(3)])
    expected, _ = info_nce(model.model.alignment.proj(cls), texts, torch.tensor(1 / config.alignment_temperature))
    torch.testing.assert_close(out.alignment_loss, expected)


def test_alignment_on_the_prefix_projects_the_flattened_prefix_tokens():
    config = MicroVLMConfig.from_preset("tiny", alignment_image_source="prefix")
    torch.manual_seed(0)
    model = MicroVLMForCausalLM(config).eval()
    assert model.model.alignment.proj.in_features == config.num_image_tokens * config.text_config.hidden_size
    inputs = make_inputs(config, [4, 7, 2])
    out = model(**inputs, labels=inputs["input_ids"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embeds = model.get_input_embeddings()(ids)
    texts = torch.stack([embeds[r][(mask[r] == 1) & (ids[r] != config.image_token_id)].mean(0) for r in range(3)])
    images = model.model.alignment.proj(out.image_prefix.reshape(3, -1))
    expected, _ = info_nce(images, texts, torch.tensor(1 / config.alignment_temperature))
    torch.testing.assert_close(out.alignment_loss, expected)


def test_gradients_reach_adapter_and_alignment_but_not_frozen_towers(tiny_model, tiny_config):
    tiny_model.train()
    tiny_model.model.vision_tower.requires_grad_(False)
    tiny_model.model.language_model.requires_grad_(False)
    tiny_model.lm_head.requires_grad_(False)
    inputs = make_inputs(tiny_config, [5, 5])
    tiny_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for name, param in tiny_model.named_parameters():
        trained = name.startswith(("model.adapter.", "model.alignment.proj."))
        assert (param.grad is not None and param.grad.abs().sum() > 0) == trained, name


def test_a_frozen_vision_tower_keeps_its_batch_norm_statistics_in_training_mode(tiny_config):
    torch.manual_seed(0)
    model = MicroVLMForCausalLM(tiny_config)
    inputs = make_inputs(tiny_config, [5, 5])
    stats = {name: buffer.clone() for name, buffer in model.model.vision_tower.named_buffers()}
    model.train()
    assert model.model.vision_tower.training  # trainable: batch statistics, running averages move
    model(**inputs, labels=inputs["input_ids"])
    assert any(not torch.equal(stats[n], b) for n, b in model.model.vision_tower.named_buffers() if "running" in n)
    model.model.vision_tower.requires_grad_(False)
    model.train()
    assert model.training and model.model.adapter.training and not model.model.vision_tower.training
    stats = {name: buffer.clone() for name, buffer in model.model.vision_tower.named_buffers()}
    model(**inputs, labels=inputs["input_ids"])
    assert all(torch.equal(stats[n], b) for n, b in model.model.vision_tower.named_buffers())


def test_placeholder_count_mismatch_is_a_clear_error(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config, [5])
    inputs["input_ids"][0, -1] = tiny_config.image_token_id
    with pytest.raises(ValueError, match="placeholder"):
        tiny_model(**inputs)


@pytest.mark.parametrize("tower", ["tiny preset", "deit"])
def test_pretrained_backbones_load_from_local_folders(tmp_path, tower):
    overrides = DEIT_TINY if tower == "deit" else {}
    tiny_config = MicroVLMConfig.from_preset("tiny", **overrides)
    torch.manual_seed(3)
    vision = AutoModel.from_config(tiny_config.vision_config, **tiny_config.vision_tower_kwargs)
    language = Qwen2ForCausalLM(Qwen2Config(**tiny_config.text_config.to_dict()))
    vision.save_pretrained(tmp_path / "vision")
    language.save_pretrained(tmp_path / "language")
    settings = (
        "vision_tower_kwargs",
        "vision_cls_token",
        "vision_num_patches",
        "adapter_patch_positions",
        "alignment_image_source",
    )
    model = MicroVLMForCausalLM.from_pretrained_backbones(
        tmp_path / "vision",
        tmp_path / "language",
        image_token_id=3,
        **{name: getattr(tiny_config, name) for name in settings},
    )
    for name, tensor in vision.state_dict().items():
        torch.testing.assert_close(model.model.vision_tower.state_dict()[name], tensor)
    for name, tensor in language.model.state_dict().items():
        torch.testing.assert_close(model.model.language_model.state_dict()[name], tensor)
    assert model.config.num_image_tokens == tiny_config.num_image_tokens
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_target_aware_info_nce_matches_an_independent_loop_with_repeated_captions():
    torch.manual_seed(2)
    captions = ["two red circles", "one blue star", "two red circles", "four green squares", "one blue star", "x"]
    images, texts = torch.randn(6, 16), torch.randn(6, 16)
    tau = 0.1
    positives = torch.tensor([[a == b for b in captions] for a in captions])
    loss, logits = info_nce(images, texts, torch.tensor(1 / tau), positives)
    # Reference: every row's target is uniform over the rows whose caption equals its own, in both directions.
    reference = 0.0
    for i in range(6):
        matches = [j for j in range(6) if captions[j] == captions[i]]
        sims_i2t = torch.stack([F.cosine_similarity(images[i], texts[j], dim=0) / tau for j in range(6)])
        sims_t2i = torch.stack([F.cosine_similarity(texts[i], images[j], dim=0) / tau for j in range(6)])
        reference += sum(torch.logsumexp(sims_i2t, 0) - sims_i2t[j] for j in matches) / len(matches)
        reference += sum(torch.logsumexp(sims_t2i, 0) - sims_t2i[j] for j in matches) / len(matches)
    torch.testing.assert_close(loss, reference / 12, rtol=1e-5, atol=1e-5)
    # Without repeats the soft targets are the identity: CLIP's loss.
    unique = torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(
        info_nce(images, texts, torch.tensor(1 / tau), unique)[0], info_nce(images, texts, torch.tensor(1 / tau))[0]
    )
    with pytest.raises(ValueError, match="diagonal"):
        info_nce(images, texts, torch.tensor(1 / tau), ~unique)


def test_equal_sequences_ignores_padding_and_placeholders_wherever_they_are():
    ids = torch.tensor([[0, 0, 3, 3, 7, 8], [3, 3, 7, 8, 0, 0], [0, 3, 3, 7, 8, 9], [3, 7, 3, 8, 0, 0]])
    mask = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 0, 0]]).bool()
    expected = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 1, 0], [1, 1, 0, 1]]).bool()
    assert torch.equal(equal_sequences(ids, mask), expected)


def test_alignment_treats_rows_with_equal_texts_as_positives(tiny_model, tiny_config):
    inputs = make_inputs(tiny_config, [4, 4, 3])
    inputs["input_ids"][1] = inputs["input_ids"][0]  # rows 0 and 1: the same caption, different images
    out = tiny_model(**inputs, labels=inputs["input_ids"])
    ids = inputs["input_ids"]
    image = tiny_model.get_image_features(inputs["pixel_values"])
    embedded, _ = tiny_model.embed_images_and_texts(inputs["pixel_values"], ids, inputs["attention_mask"])
    words = (ids != tiny_config.image_token_id) & inputs["attention_mask"].bool()
    texts = torch.stack([tiny_model.get_input_embeddings()(ids[r][words[r]]).mean(0) for r in range(3)])
    positives = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]]).bool()
    images = tiny_model.model.alignment.proj(tiny_model._alignment_input(image))
    expected, _ = info_nce(images, texts, torch.tensor(1 / tiny_config.alignment_temperature), positives)
    torch.testing.assert_close(out.alignment_loss, expected)
    torch.testing.assert_close(embedded, F.normalize(images, dim=-1))


def _adapter(config: MicroVLMConfig) -> MicroVLMVisionAdapter:
    torch.manual_seed(4)
    return MicroVLMForCausalLM(config).model.adapter.eval()


def test_adapter_without_patch_positions_is_the_order_blind_pooling_it_was(tiny_config):
    config = MicroVLMConfig.from_preset("tiny", adapter_patch_positions=False)
    adapter = _adapter(config)
    assert adapter.patch_position_embeddings is None
    assert not any("patch_position" in name for name, _ in adapter.named_parameters())
    patches = torch.randn(2, config.num_patches, config.vision_hidden_size)
    keys = adapter.mlp(adapter.input_proj(patches))
    pooled, _ = adapter.pool(adapter.queries.expand(2, -1, -1), keys, keys)
    prefix, _ = adapter(patches)
    torch.testing.assert_close(prefix, adapter.norm(pooled + adapter.position_embeddings))
    shuffled, _ = adapter(patches[:, torch.randperm(config.num_patches)])
    torch.testing.assert_close(shuffled, prefix)  # cross-attention pooling cannot tell where a patch was


def test_adapter_patch_positions_are_added_to_the_keys_and_trained(tiny_config):
    config = MicroVLMConfig.from_preset("tiny", adapter_patch_positions=True)
    adapter = _adapter(config)
    assert adapter.patch_position_embeddings.shape == (config.num_patches, config.text_config.hidden_size)
    patches = torch.randn(2, config.num_patches, config.vision_hidden_size)
    keys = adapter.mlp(adapter.input_proj(patches)) + adapter.patch_position_embeddings
    pooled, _ = adapter.pool(adapter.queries.expand(2, -1, -1), keys, keys)
    prefix, _ = adapter(patches)
    torch.testing.assert_close(prefix, adapter.norm(pooled + adapter.position_embeddings))
    shuffled, _ = adapter(patches[:, torch.randperm(config.num_patches)])
    assert not torch.allclose(shuffled, prefix)  # now the prefix depends on where each patch is
    prefix.square().sum().backward()
    assert adapter.patch_position_embeddings.grad.abs().sum() > 0


def save_tiny_bitnet_backbones(folder: Path, packed: bool) -> tuple[Path, Path, BitNetForCausalLM]:
    """A tiny DeiT (64 px, 8 px patches: the tiny presets' 64 patches) and a tiny BitNet LM saved like their Hub
    checkpoints: the LM in master form, or (`packed`) as transformers' BitNet quantizer stores it (uint8 weights of
    2-bit codes + `weight_scale`, `quantization_config.quant_method == "bitnet"`)."""
    torch.manual_seed(5)
    vision = DeiTModel(
        DeiTConfig(
            image_size=64,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        ),
        add_pooling_layer=False,
    )
    text = MicroVLMConfig.from_preset("tiny-m").text_config
    language = BitNetForCausalLM(BitNetConfig(**{k: v for k, v in text.to_dict().items() if k != "layer_types"}))
    vision.save_pretrained(folder / "vision")
    language.save_pretrained(folder / "language")
    if packed:
        state = {}
        for name, tensor in language.state_dict().items():
            if name.endswith("_proj.weight"):
                state[name], state[name.replace(".weight", ".weight_scale")] = pack_ternary(tensor)
            else:
                state[name] = tensor
        state.pop("lm_head.weight")  # tied: transformers saves the embedding only
        save_file(
            {name: tensor.contiguous() for name, tensor in state.items()}, folder / "language" / "model.safetensors"
        )
        language.config.quantization_config = {"quant_method": "bitnet", "linear_class": "bitlinear"}
        language.config.save_pretrained(folder / "language")
    return folder / "vision", folder / "language", language


@pytest.mark.parametrize("packed", [False, True], ids=["master-weights", "packed-ternary"])
def test_from_pretrained_backbones_builds_microvlm_m_from_local_deit_and_bitnet_folders(tmp_path, packed):
    vision_folder, language_folder, language = save_tiny_bitnet_backbones(tmp_path, packed)
    model = MicroVLMForCausalLM.from_pretrained_backbones(
        vision_folder, language_folder, preset="tiny-m", vision_cls_token=True, vision_tower_kwargs={}
    )
    assert model.config.adapter_mlp_hidden_size == 64 and model.config.lm_use_bitnet
    assert model.config.text_config.model_type == "bitnet"
    assert "quantization_config" not in model.config.text_config.to_dict()
    ours = model.model.language_model.layers[0].self_attn.k_proj
    assert isinstance(ours, BitLinear)
    values, inverse_scale = ternary_weight(language.model.layers[0].self_attn.k_proj.weight)
    # Master weights load as they are; packed ones as latents that requantise to exactly the packed W_q.
    if not packed:
        torch.testing.assert_close(ours.weight, language.model.layers[0].self_attn.k_proj.weight)
    torch.testing.assert_close(ours.quantised_weight(), values / inverse_scale)
    torch.testing.assert_close(model.get_input_embeddings().weight, language.get_input_embeddings().weight)
    inputs = make_inputs(model.config, [4])
    assert model.eval()(**inputs, labels=inputs["input_ids"]).loss.isfinite()
