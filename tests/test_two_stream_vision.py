"""The two-stream tower (RGB stream + hue-free contrast-map stream) against independent references."""

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel

from microvlm import MicroVLMConfig
from microvlm.two_stream_vision import TwoStreamVisionConfig, TwoStreamVisionModel, contrast_map


def stream(channels: int, widths: list[int]) -> dict:
    """A 3-stage ResNet stream (64 px → 4 × 4 map)."""
    return {
        "model_type": "resnet",
        "num_channels": channels,
        "embedding_size": widths[0],
        "hidden_sizes": widths,
        "depths": [1, 1, 1],
        "layer_type": "basic",
        "downsample_in_first_stage": False,
    }


def small_config(**overrides) -> TwoStreamVisionConfig:
    values = {"rgb_config": stream(3, [8, 8, 16]), "contrast_config": stream(1, [8, 16, 24]), "image_size": 64}
    return TwoStreamVisionConfig(**{**values, **overrides})


def test_contrast_map_is_each_pixels_distance_from_the_median_colour_over_the_largest_distance():
    pixels = torch.randn(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    array = pixels.numpy().astype(np.float64)
    # torch's median of an even count is the lower of the two middle values: take the same order statistic.
    flat = np.sort(array.reshape(3, 3, -1), axis=-1)
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


def test_tower_output_is_the_rgb_streams_map_beside_the_contrast_streams_map():
    torch.manual_seed(0)
    tower = AutoModel.from_config(small_config()).eval()
    assert isinstance(tower, TwoStreamVisionModel)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = tower(pixel_values=pixels)
        rgb = tower.rgb(pixel_values=pixels).last_hidden_state
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
    with pytest.raises(ValueError, match="same number of downsampling stages"):
        tower(pixel_values=torch.randn(1, 3, 64, 64))
