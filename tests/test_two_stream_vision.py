"""The two-stream tower (RGB stream + hue-free contrast-map stream) against independent references."""

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel

from microvlm import MicroVLMConfig
from microvlm.two_stream_vision import TwoStreamVisionConfig, TwoStreamVisionModel, coarse_view, contrast_map


def stream(channels: int, widths: list[int]) -> dict:
    """A ResNet stream with one stage per width: stem /4, then /2 per stage after the first (3 stages: 64 px → 4 × 4;
    1 stage: 16 px → 4 × 4)."""
    return {
        "model_type": "resnet",
        "num_channels": channels,
        "embedding_size": widths[0],
        "hidden_sizes": widths,
        "depths": [1] * len(widths),
        "layer_type": "basic",
        "downsample_in_first_stage": False,
    }


def small_config(**overrides) -> TwoStreamVisionConfig:
    values = {"rgb_config": stream(3, [8, 8, 16]), "contrast_config": stream(1, [8, 16, 24]), "image_size": 64}
    return TwoStreamVisionConfig(**{**values, **overrides})


def test_contrast_map_is_each_pixels_distance_from_the_median_colour_of_a_16_by_16_grid_over_the_largest():
    pixels = torch.randn(3, 3, 40, 52, generator=torch.Generator().manual_seed(0))
    array = pixels.numpy().astype(np.float64)
    grid = array[:, :, ::2, ::3]  # every (40 // 16)-th row and (52 // 16)-th column
    # torch's median of an even count is the lower of the two middle values: take the same order statistic.
    flat = np.sort(grid.reshape(3, 3, -1), axis=-1)
    median = flat[..., (flat.shape[-1] - 1) // 2][..., None, None]
    distance = np.sqrt(((array - median) ** 2).sum(axis=1, keepdims=True))
    expected = distance / distance.reshape(3, -1).max(axis=1)[:, None, None, None]
    torch.testing.assert_close(contrast_map(pixels), torch.from_numpy(expected).float(), rtol=1e-5, atol=1e-6)


def test_contrast_map_is_the_same_silhouette_whatever_the_colour_of_the_shapes():
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[3:9, 4:12] = True  # the shapes cover less than half the image: the median colour is the background
    images = []
    for colour in ((0.9, 0.1, 0.1), (0.1, 0.6, 0.2), (0.2, 0.3, 0.95)):
        image = torch.full((3, 16, 16), 0.5)
        image[:, mask] = torch.tensor(colour)[:, None]
        images.append(image)
    maps = contrast_map(torch.stack(images))
    for silhouette in maps:
        torch.testing.assert_close(silhouette[0], mask.float())
    assert contrast_map(torch.full((1, 3, 8, 8), 0.3)).abs().max() == 0  # a flat image has no contrast


def test_coarse_view_is_the_image_of_block_means():
    pixels = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(1))
    expected = pixels.numpy().reshape(2, 3, 2, 4, 3, 4).mean(axis=(3, 5))  # (B, C, H/4, W/4) block means
    torch.testing.assert_close(coarse_view(pixels, 4), torch.from_numpy(expected))
    assert coarse_view(pixels, 1) is pixels


def test_rgb_pool_factor_must_divide_the_image_size():
    with pytest.raises(ValueError, match=r"rgb_pool_factor must be a positive divisor of image_size=64"):
        small_config(rgb_pool_factor=5)


def test_tower_output_is_the_rgb_streams_map_beside_the_contrast_streams_map():
    torch.manual_seed(0)
    tower = AutoModel.from_config(small_config(rgb_config=stream(3, [16]), rgb_pool_factor=4)).eval()
    assert isinstance(tower, TwoStreamVisionModel)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = tower(pixel_values=pixels)
        rgb = tower.rgb(pixel_values=coarse_view(pixels, 4)).last_hidden_state
        contrast = tower.contrast(pixel_values=contrast_map(pixels)).last_hidden_state
    assert out.last_hidden_state.shape == (2, 16 + 24, 4, 4)
    torch.testing.assert_close(out.last_hidden_state, torch.cat([rgb, contrast], dim=1))
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean((2, 3)))
    assert tower.config.hidden_sizes == [40]


def test_both_streams_get_gradients():
    tower = AutoModel.from_config(small_config())
    tower(pixel_values=torch.randn(2, 3, 64, 64)).last_hidden_state.square().mean().backward()
    for name in ("rgb", "contrast"):
        grads = [p.grad for p in getattr(tower, name).parameters() if p.requires_grad]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name


def test_config_round_trips_through_its_dict_and_inside_a_microvlm_config(tmp_path):
    config = small_config()
    again = AutoConfig.for_model(**config.to_dict())
    assert isinstance(again, TwoStreamVisionConfig)
    assert again.to_dict() == config.to_dict()
    vlm = MicroVLMConfig.from_preset("tiny", vision_config=config.to_dict())
    vlm.save_pretrained(tmp_path)
    loaded = MicroVLMConfig.from_pretrained(tmp_path)
    assert loaded.vision_config.to_dict() == config.to_dict()
    assert loaded.vision_hidden_size == 40


def test_a_contrast_stream_with_more_than_one_input_channel_is_refused():
    with pytest.raises(ValueError, match=r"contrast_config.num_channels must be 1"):
        small_config(contrast_config=stream(3, [8, 16, 24]))


def test_streams_with_different_map_sizes_are_refused_naming_the_fix():
    two_stage = {**stream(1, [8, 16]), "depths": [1, 1]}
    tower = AutoModel.from_config(small_config(contrast_config=two_stage))
    with pytest.raises(ValueError, match="downsample their inputs .* to the same size"):
        tower(pixel_values=torch.randn(1, 3, 64, 64))


def test_trainable_vision_layers_train_the_last_stages_of_each_stream():
    from microvlm import MicroVLMForCausalLM
    from microvlm.train.cli import freeze_for_stage

    with torch.device("meta"):
        model = MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny"))
    freeze_for_stage(model, ["adapter"], trainable_lm_layers=0, trainable_vision_layers=1)
    for stream in (model.model.vision_tower.rgb, model.model.vision_tower.contrast):
        stages = stream.encoder.stages
        trained = [any(p.requires_grad for p in stage.parameters()) for stage in stages]
        assert trained == [False] * (len(stages) - 1) + [True]
        assert not any(p.requires_grad for p in stream.embedder.parameters())


def test_without_rgb_the_tower_gives_zeros_for_the_rgb_channels_and_the_contrast_map_unchanged_until_the_block_ends():
    torch.manual_seed(0)
    tower = TwoStreamVisionModel(small_config()).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = tower(pixel_values=pixels).last_hidden_state
        with tower.without_rgb():
            dropped = tower(pixel_values=pixels).last_hidden_state
        with pytest.raises(RuntimeError), tower.without_rgb():
            raise RuntimeError("an error inside the block")
        after = tower(pixel_values=pixels).last_hidden_state
    assert full[:, :16].abs().sum() > 0 and dropped[:, :16].abs().sum() == 0  # the RGB stream's 16 channels
    torch.testing.assert_close(dropped[:, 16:], full[:, 16:])
    torch.testing.assert_close(after, full)
