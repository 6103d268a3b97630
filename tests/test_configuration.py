import pytest
import torch
from transformers import AutoConfig, BitNetConfig, DeiTConfig, Qwen2Config

from microvlm import MicroVLMConfig, MicroVLMForCausalLM


def test_presets_have_the_reference_dimensions():
    config = MicroVLMConfig.from_preset("microvlm-v")
    vision, text = config.vision_config, config.text_config
    assert isinstance(vision, DeiTConfig) and isinstance(text, Qwen2Config)
    assert (vision.image_size, vision.patch_size, vision.hidden_size) == (224, 16, 192)
    assert config.num_patches == 196 and config.num_image_tokens == 25
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        896,
        24,
        14,
        2,
    )
    assert text.hidden_size // text.num_attention_heads == 64 and text.vocab_size == 151936
    assert config.tie_word_embeddings and config.image_token_id == 151655
    assert "tiny" in MicroVLMConfig.preset_names()


def test_microvlm_m_is_transformers_bitnet_default_shape_with_the_seeds_switches():
    config = MicroVLMConfig.from_preset("microvlm-m")
    assert isinstance(config.text_config, BitNetConfig)
    defaults = BitNetConfig()
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(config.text_config, name) == getattr(defaults, name), name
    assert config.text_config.rope_parameters["rope_theta"] == 500000.0 and config.text_config.hidden_act == "relu2"
    assert config.vision_config == MicroVLMConfig.from_preset("microvlm-v").vision_config  # DeiT-Tiny, inherited
    assert (config.memory_num_slots, config.scope_hidden_size, config.scope_num_layers) == (128, 256, 1)
    assert (config.alignment_dim, config.alignment_temperature, config.adapter_hidden_size) == (512, 0.07, 512)
    assert (config.alignment_loss_weight, config.memory_reconstruction_weight, config.scope_loss_weight) == (
        0.5,
        0.1,
        0.01,
    )
    tiny_m = MicroVLMConfig.from_preset("tiny-m").text_config
    assert tiny_m.num_attention_heads == 4 * tiny_m.num_key_value_heads  # GQA 4:1 like the 2B-4T LM
    assert {"tiny", "tiny-m", "microvlm-v", "microvlm-m"} <= set(MicroVLMConfig.preset_names())


@pytest.mark.parametrize("preset", ["tiny", "microvlm-v"])
def test_the_new_fields_default_to_the_layout_the_presets_had(preset):
    with torch.device("meta"):
        state = MicroVLMForCausalLM(MicroVLMConfig.from_preset(preset, use_memory=True)).state_dict()
    config = MicroVLMConfig.from_preset(preset)
    hidden = config.text_config.hidden_size
    assert state["model.adapter.mlp.0.weight"].shape == (2 * hidden, hidden)  # ratio 2, names mlp.0 / mlp.2
    assert state["model.adapter.mlp.2.weight"].shape == (hidden, 2 * hidden)
    assert state["model.alignment.proj.weight"].shape == (hidden, config.alignment_input_size)
    assert not any(name.startswith("model.alignment.text_proj") for name in state)
    scope = sorted(name for name in state if name.startswith("model.memory.scope_net.") and name.endswith("weight"))
    assert scope == [f"model.memory.scope_net.net.{index}.weight" for index in (0, 3, 6)]  # C→h→h→1


@pytest.mark.parametrize(
    ("image_size", "patch_size", "expected"),
    [(224, 16, 25), (32, 8, 8), (64, 8, 8), (72, 8, 11), (512, 8, 64)],
)
def test_prefix_length_is_clamped_ceil_of_patches_over_eight(image_size, patch_size, expected):
    config = MicroVLMConfig(vision_config={"image_size": image_size, "patch_size": patch_size})
    assert config.num_image_tokens == expected


def test_sub_configs_accept_dicts_objects_and_any_model_type():
    from_objects = MicroVLMConfig(
        vision_config=DeiTConfig(hidden_size=48), text_config=Qwen2Config(hidden_size=64, num_attention_heads=4)
    )
    from_dicts = MicroVLMConfig(
        vision_config={"model_type": "deit", "hidden_size": 48},
        text_config={"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4},
    )
    assert from_objects.vision_config.to_dict() == from_dicts.vision_config.to_dict()
    gpt2 = MicroVLMConfig(text_config={"model_type": "gpt2", "n_embd": 64, "n_head": 4}, adapter_num_heads=4)
    assert gpt2.text_config.model_type == "gpt2"


def test_save_load_round_trip_through_auto_config(tmp_path):
    config = MicroVLMConfig.from_preset("tiny", alignment_temperature=0.1)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MicroVLMConfig)
    without_path = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert without_path(loaded) == without_path(config)
    assert loaded.auto_map["AutoModelForCausalLM"] == "modeling_microvlm.MicroVLMForCausalLM"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"adapter_num_heads": 7}, "adapter_num_heads"),
        ({"alignment_temperature": 0.0}, "alignment_temperature"),
        ({"alignment_image_source": "pooled"}, "alignment_image_source"),
        ({"min_prefix_tokens": 9, "max_prefix_tokens": 4}, "min_prefix_tokens"),
        ({"vision_config": 3}, "vision_config"),
        ({"adapter_dropout": 1.0}, "adapter_dropout"),
        ({"scope_num_layers": 0}, "scope_num_layers"),
    ],
)
def test_bad_settings_fail_with_a_message_naming_the_field(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        MicroVLMConfig(**kwargs)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="tiny"):
        MicroVLMConfig.from_preset("no-such-preset")
