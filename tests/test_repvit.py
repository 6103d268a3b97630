"""Specification of the RepViT vision tower: built through the Auto classes, map shapes, parameter count against an
independent count and timm's published figure, gradients, save/load, timm key renaming, and MicroVLM with it."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModel
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from microvlm import MicroVLMConfig, MicroVLMForCausalLM, RepViTConfig, RepViTModel, repvit_state_dict_from_timm
from microvlm.train.cli import freeze_for_stage

from .conftest import make_inputs


# What the README recommends for tests and demos: 64 px → 4×4×128, the tiny ResNet tower's 16 patches and width.
TINY_REPVIT = {"model_type": "repvit", "image_size": 64, "hidden_sizes": [32, 64, 128], "depths": [1, 1, 2]}
M0_9 = {"hidden_sizes": [48, 96, 192, 384], "depths": [2, 2, 14, 2]}  # timm repvit_m0_9
M1_5 = {"hidden_sizes": [64, 128, 256, 512], "depths": [4, 4, 24, 4]}  # timm repvit_m1_5


def tiny_config(**overrides) -> RepViTConfig:
    values = {k: v for k, v in TINY_REPVIT.items() if k != "model_type"}
    return RepViTConfig(**{**values, **overrides})


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_auto_classes_build_the_tower_from_its_model_type():
    values = {k: v for k, v in TINY_REPVIT.items() if k != "model_type"}
    config = AutoConfig.for_model("repvit", **values)
    assert type(config) is RepViTConfig and config.to_dict() == tiny_config().to_dict()
    assert type(AutoModel.from_config(config)) is RepViTModel


@pytest.mark.parametrize(
    "values, image_size, expected",
    [
        (M0_9, 224, (384, 7, 7)),  # four stages: stride 32
        ({"hidden_sizes": [48, 96, 192], "depths": [2, 2, 14]}, 224, (192, 14, 14)),  # M0.9 read at stage 3
        (M0_9, 448, (384, 14, 14)),
        (TINY_REPVIT, 64, (128, 4, 4)),
        (TINY_REPVIT, 70, (128, 5, 5)),  # stride-2 convolutions with padding round up: ceil(70 / 16) = 5
    ],
)
@torch.no_grad()
def test_output_is_a_map_of_the_last_stage_and_its_spatial_mean(values, image_size, expected):
    config = RepViTConfig(**{k: v for k, v in values.items() if k != "model_type"})
    model = RepViTModel(config).eval()
    out = model(torch.randn(2, 3, image_size, image_size), output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, *expected)
    assert torch.allclose(out.pooler_output, out.last_hidden_state.mean((2, 3)))
    assert len(out.hidden_states) == len(config.hidden_sizes) + 1  # stem, then each stage
    assert out.hidden_states[-1] is out.last_hidden_state
    if image_size == config.image_size:
        assert expected[1] == config.image_size // config.patch_size


def conv_bn(c_in: int, c_out: int, kernel: int = 1, groups: int = 1) -> int:
    """Bias-free convolution + batch norm (γ, β)."""
    return c_in // groups * c_out * kernel * kernel + 2 * c_out


def expected_tower_parameters(hidden_sizes, depths, mlp_ratio=2, kernel=3) -> int:
    """RepViT's parameters layer by layer, as the paper and timm's `repvit.py` lay them out."""

    def token_mixer(c):  # BN(BN(dw k×k) + dw 1×1 with bias + identity)
        return conv_bn(c, c, kernel, groups=c) + 2 * c + 2 * c

    def squeeze_excitation(c):  # 1×1 convs with bias, C → r → C, r = C/4 rounded to a multiple of 8
        r = max(8, 8 * math.floor(c / 32 + 0.5))
        return c * r + r + r * c + c

    def channel_mixer(c):
        return conv_bn(c, mlp_ratio * c) + conv_bn(mlp_ratio * c, c)

    def block(c, se):
        return token_mixer(c) + (squeeze_excitation(c) if se else 0) + channel_mixer(c)

    total = conv_bn(3, hidden_sizes[0] // 2, 3) + conv_bn(hidden_sizes[0] // 2, hidden_sizes[0], 3)
    previous = hidden_sizes[0]
    for stage, (width, depth) in enumerate(zip(hidden_sizes, depths)):
        if stage > 0:
            total += block(previous, False) + conv_bn(previous, previous, kernel, previous)
            total += conv_bn(previous, width) + channel_mixer(width)
        total += sum(block(width, index % 2 == 0) for index in range(depth))
        previous = width
    return total


def timm_heads(width: int, classes: int = 1000) -> int:
    """timm's RepViT classifier: a BatchNorm1d + Linear head and a distillation head of the same shape."""
    return 2 * (2 * width + width * classes + classes)


@pytest.mark.parametrize("values", [M0_9, M1_5, TINY_REPVIT], ids=["m0_9", "m1_5", "tiny"])
def test_parameter_count_matches_the_architecture_layer_by_layer(values):
    config = RepViTConfig(**{k: v for k, v in values.items() if k != "model_type"})
    with torch.device("meta"):
        model = RepViTModel(config)
    assert count(model) == expected_tower_parameters(config.hidden_sizes, config.depths)


def test_m0_9_with_timms_two_heads_is_timms_published_5_5m():
    with torch.device("meta"):
        model = RepViTModel(RepViTConfig(**M0_9))
    # timm's model card for repvit_m0_9.dist_450e_in1k: "Params (M): 5.5", classifier and distillation head included.
    assert round((count(model) + timm_heads(384)) / 1e6, 1) == 5.5


def test_gradients_reach_every_parameter_and_the_pixels():
    torch.manual_seed(0)
    model = RepViTModel(tiny_config()).train()
    for module in model.modules():  # a fresh tower's residual branches end at γ = 0, which blocks their gradient
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    pixels = torch.randn(2, 3, 64, 64, requires_grad=True)
    out = model(pixels)
    (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
    silent = [name for name, param in model.named_parameters() if param.grad is None or not param.grad.any()]
    assert not silent
    assert pixels.grad.abs().sum() > 0


def test_fresh_residual_branches_start_silent():
    """Channel mixers end at γ = 0 (timm's `bn_weight_init=0`): a fresh block is its token mixer (and SE) alone."""
    model = RepViTModel(tiny_config()).eval()
    block = model.encoder.stages[0].layers[0]
    x = torch.randn(1, 32, 16, 16)
    with torch.no_grad():
        assert torch.equal(block.channel_mixer(x), torch.zeros_like(x))


@torch.no_grad()
def test_save_load_round_trip_through_auto_model(tmp_path):
    torch.manual_seed(0)
    model = RepViTModel(tiny_config())
    model.train()(torch.randn(4, 3, 64, 64))  # move the batch-norm statistics off their initial values
    model.eval().save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is RepViTModel
    saved_fields = {k: v for k, v in loaded.config.to_diff_dict().items() if k != "_name_or_path"}
    assert saved_fields == model.config.to_diff_dict()
    pixels = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(pixels).last_hidden_state, model(pixels).last_hidden_state)


def timm_repvit_state_dict(embed_dim, depth, mlp_ratio=2, kernel=3, classes=1000) -> dict[str, torch.Tensor]:
    """Random tensors under the names and shapes of timm's `RepVit(embed_dim, depth)` (timm/models/repvit.py,
    non-legacy): `ConvNorm` = `c` (conv) + `bn`; `RepVggDw` = `conv` (ConvNorm), `conv1` (dw 1×1 with bias), `bn`;
    `SqueezeExcite` = `fc1`, `fc2`; `RepVitMlp` = `conv1`, `conv2`; `RepVitDownsample` = `pre_block`,
    `spatial_downsample`, `channel_downsample`, `ffn`; `RepVitStage` = `downsample`, `blocks`."""
    shapes = {}

    def conv_norm(prefix, c_in, c_out, k=1, groups=1):
        shapes[f"{prefix}.c.weight"] = (c_out, c_in // groups, k, k)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{name}"] = (c_out,)
        shapes[f"{prefix}.bn.num_batches_tracked"] = ()

    def block(prefix, c, se):
        conv_norm(f"{prefix}.token_mixer.conv", c, c, kernel, groups=c)
        shapes[f"{prefix}.token_mixer.conv1.weight"] = (c, 1, 1, 1)
        shapes[f"{prefix}.token_mixer.conv1.bias"] = (c,)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.token_mixer.bn.{name}"] = (c,)
        shapes[f"{prefix}.token_mixer.bn.num_batches_tracked"] = ()
        if se:
            r = max(8, int(c * 0.25 + 4) // 8 * 8)
            shapes.update({f"{prefix}.se.fc1.weight": (r, c, 1, 1), f"{prefix}.se.fc1.bias": (r,)})
            shapes.update({f"{prefix}.se.fc2.weight": (c, r, 1, 1), f"{prefix}.se.fc2.bias": (c,)})
        mlp(f"{prefix}.channel_mixer", c)

    def mlp(prefix, c):
        conv_norm(f"{prefix}.conv1", c, mlp_ratio * c)
        conv_norm(f"{prefix}.conv2", mlp_ratio * c, c)

    conv_norm("stem.conv1", 3, embed_dim[0] // 2, 3)
    conv_norm("stem.conv2", embed_dim[0] // 2, embed_dim[0], 3)
    for i, (width, blocks) in enumerate(zip(embed_dim, depth)):
        if i > 0:
            previous = embed_dim[i - 1]
            block(f"stages.{i}.downsample.pre_block", previous, se=False)
            conv_norm(f"stages.{i}.downsample.spatial_downsample", previous, previous, kernel, groups=previous)
            conv_norm(f"stages.{i}.downsample.channel_downsample", previous, width)
            mlp(f"stages.{i}.downsample.ffn", width)
        for j in range(blocks):
            block(f"stages.{i}.blocks.{j}", width, se=j % 2 == 0)
    for head in ("head", "head_dist"):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"head.{head}.bn.{name}"] = (embed_dim[-1],)
        shapes[f"head.{head}.bn.num_batches_tracked"] = ()
        shapes.update({f"head.{head}.l.weight": (classes, embed_dim[-1]), f"head.{head}.l.bias": (classes,)})
    generator = torch.Generator().manual_seed(0)
    return {
        name: torch.randint(0, 100, shape, generator=generator)
        if name.endswith("num_batches_tracked")
        else torch.randn(shape, generator=generator)
        for name, shape in shapes.items()
    }


@pytest.mark.parametrize("values", [M0_9, TINY_REPVIT], ids=["m0_9", "tiny"])
def test_timm_state_dict_renames_onto_every_tower_tensor(values):
    config = RepViTConfig(**{k: v for k, v in values.items() if k != "model_type"})
    timm_state = timm_repvit_state_dict(config.hidden_sizes, config.depths)
    renamed = repvit_state_dict_from_timm(timm_state)
    model = RepViTModel(config)
    model.load_state_dict(renamed, strict=True)  # every parameter and buffer named, every shape right
    assert len(renamed) == len(timm_state) - sum(name.startswith("head.") for name in timm_state)
    ours = model.state_dict()
    timm_tensors = {id(tensor) for name, tensor in timm_state.items() if not name.startswith("head.")}
    assert {id(tensor) for tensor in renamed.values()} == timm_tensors  # renamed, not copied
    assert all(torch.equal(ours[name], tensor) for name, tensor in renamed.items())


def test_a_tower_cut_after_stage_3_loads_the_first_three_stages_of_a_timm_checkpoint():
    """The README's 14×14 map of M0.9 at 224 px: list three stages, keep the keys that are not stage 4's."""
    renamed = repvit_state_dict_from_timm(timm_repvit_state_dict(M0_9["hidden_sizes"], M0_9["depths"]))
    model = RepViTModel(RepViTConfig(hidden_sizes=[48, 96, 192], depths=[2, 2, 14]))
    model.load_state_dict({k: v for k, v in renamed.items() if not k.startswith("encoder.stages.3.")}, strict=True)


def test_legacy_timm_checkpoints_are_refused_by_name():
    legacy = {"stages.0.blocks.0.token_mixer.conv1.c.weight": torch.zeros(48, 1, 1, 1)}
    with pytest.raises(ValueError, match="legacy"):
        repvit_state_dict_from_timm(legacy)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"hidden_sizes": []}, "hidden_sizes"),
        ({"hidden_sizes": [31, 64]}, "hidden_sizes"),
        ({"depths": [1, 1]}, "depths"),
        ({"depths": [1, -1, 1]}, "depths"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"se_ratio": 1.5}, "se_ratio"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"image_size": -64}, "image_size"),
        ({"image_size": 72}, "image_size"),  # not a multiple of the stride, 16
        ({"hidden_act": "swishy"}, "hidden_act"),
        ({"batch_norm_eps": 0.0}, "batch_norm_eps"),
        ({"patch_size": 16}, "patch_size"),  # derived from the stages, not set
    ],
)
def test_bad_settings_fail_with_a_message_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"RepViTConfig.{field}"):
        tiny_config(**overrides)


def test_microvlm_with_a_repvit_tower_reads_its_map_as_patches_and_generates():
    config = MicroVLMConfig.from_preset("tiny", vision_config=TINY_REPVIT, vision_num_patches=None)
    assert config.num_patches == 16 and config.vision_hidden_size == 128  # from the tower's config alone
    torch.manual_seed(0)
    model = MicroVLMForCausalLM(config).eval()
    assert type(model.model.vision_tower) is RepViTModel
    inputs = make_inputs(config, [5, 2])
    with torch.no_grad():
        logits = model(**inputs).logits
        other = model(**{**inputs, "pixel_values": inputs["pixel_values"].flip(-1)}).logits
    assert logits.shape == (*inputs["input_ids"].shape, config.text_config.vocab_size)
    assert not torch.allclose(logits[:, -1], other[:, -1])  # the answer depends on the image
    generated = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 4)


def test_trainable_vision_layers_count_the_towers_stages_from_the_end():
    config = MicroVLMConfig.from_preset("tiny", vision_config=TINY_REPVIT, vision_num_patches=None)
    with torch.device("meta"):
        model = MicroVLMForCausalLM(config)
    counts = freeze_for_stage(model, ["adapter"], trainable_lm_layers=0, trainable_vision_layers=1)
    tower = model.model.vision_tower
    assert counts["vision"] == count(tower.encoder.stages[-1])
    assert all(param.requires_grad == name.startswith("encoder.stages.2.") for name, param in tower.named_parameters())


def test_a_folders_remote_code_imported_in_process_keeps_its_own_tower_and_leaves_the_registration(tmp_path):
    """Importing a saved folder's modules (as `trust_remote_code` does) registers its copy of repvit.py: the name
    "repvit" stays the package's, and the folder's MicroVLM builds its tower from the folder's copy."""
    config = MicroVLMConfig.from_preset("tiny", vision_config=TINY_REPVIT, vision_num_patches=None)
    MicroVLMForCausalLM(config).save_pretrained(tmp_path)
    remote_class = get_class_from_dynamic_module("modeling_microvlm.MicroVLMForCausalLM", str(tmp_path))
    assert remote_class is not MicroVLMForCausalLM
    loaded = remote_class.from_pretrained(tmp_path)
    tower = loaded.model.vision_tower
    assert type(tower).__module__.startswith("transformers_modules") and type(tower) is not RepViTModel
    assert type(loaded.config.vision_config) is type(tower).config_class
    assert type(AutoConfig.for_model("repvit")) is RepViTConfig
    assert type(MicroVLMConfig(vision_config=TINY_REPVIT).vision_config) is RepViTConfig
