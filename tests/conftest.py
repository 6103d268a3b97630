"""Shared fixtures: the "tiny" preset built in-process (no download), and inputs shaped like the processor's."""

import os

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from microvlm import MicroVLMConfig, MicroVLMForCausalLM, MicroVLMProcessor  # noqa: E402


@pytest.fixture
def tiny_config() -> MicroVLMConfig:
    return MicroVLMConfig.from_preset("tiny")


@pytest.fixture
def tiny_model(tiny_config: MicroVLMConfig) -> MicroVLMForCausalLM:
    torch.manual_seed(0)
    return MicroVLMForCausalLM(tiny_config).eval()


@pytest.fixture(params=["tiny", "tiny-m", "tiny-ember"])
def family_model(request) -> MicroVLMForCausalLM:
    """The small preset of each family, seed 0, eval mode: "tiny" (Qwen2-style LM), "tiny-m" (BitNet b1.58 LM),
    "tiny-ember" (GPT-2-style LM with the reasoning module)."""
    torch.manual_seed(0)
    return MicroVLMForCausalLM(MicroVLMConfig.from_preset(request.param)).eval()


@pytest.fixture(scope="module")
def processor() -> MicroVLMProcessor:
    """The tiny preset's processor (offline: its tokenizer ships with the package)."""
    return MicroVLMProcessor.from_preset("tiny")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A folder with a random tiny model and its processor, as `save_pretrained` writes them."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny")).save_pretrained(folder)
    MicroVLMProcessor.from_preset("tiny").save_pretrained(folder)
    return folder


def make_inputs(config: MicroVLMConfig, text_lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch: row i = k image placeholders + `text_lengths[i]` random text tokens, one image each."""
    generator = torch.Generator().manual_seed(seed)
    k, total = config.num_image_tokens, config.num_image_tokens + max(text_lengths)
    input_ids = torch.zeros(len(text_lengths), total, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(text_lengths):
        text = torch.randint(10, config.text_config.vocab_size, (length,), generator=generator)
        input_ids[row, total - k - length :] = torch.cat([torch.full((k,), config.image_token_id), text])
        attention_mask[row, total - k - length :] = 1
    size = config.vision_config.image_size
    pixel_values = torch.randn(len(text_lengths), 3, size, size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
