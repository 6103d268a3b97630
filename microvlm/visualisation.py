"""Figures of what a MicroVLM attends to and remembers, for training callbacks and evaluation reports.

Each function takes a model and a collated batch (see `MicroVLMCollator`) and returns a matplotlib Figure:
the text × prefix attention of the language model, the memory's addressing weights (episode steps × slots),
and the image–text similarity matrix of the alignment head.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _heatmap(matrix: torch.Tensor, title: str, xlabel: str, ylabel: str, cmap: str = "viridis") -> Figure:
    figure, axis = plt.subplots(figsize=(6, 4.5))
    image = axis.imshow(matrix.detach().float().cpu().numpy(), aspect="auto", cmap=cmap)
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    return figure


@contextmanager
def eager_language_attention(model) -> Iterator[None]:
    """Run the language model on eager attention inside the block (sdpa returns no attention weights). Only the
    LM is switched: convolutional vision towers (ResNet, ConvNeXt) have no attention implementation to set."""
    language = model.model.language_model
    previous = language.config._attn_implementation
    language.set_attn_implementation("eager")
    try:
        yield
    finally:
        language.set_attn_implementation(previous)


@torch.no_grad()
def text_prefix_attention(model, batch: dict[str, torch.Tensor], row: int = 0) -> Figure:
    """Attention of row `row`'s text tokens (y) over its image prefix tokens (x), averaged over layers and heads."""
    with eager_language_attention(model):
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch.get("pixel_values"),
            output_attentions=True,
            use_memory=False,
        )
    attention = torch.stack(out.attentions).mean((0, 2))[row]  # (T, T)
    ids, mask = batch["input_ids"][row], batch["attention_mask"][row].bool()
    prefix = (ids == model.config.image_token_id) & mask
    text = (ids != model.config.image_token_id) & mask
    return _heatmap(
        attention[text][:, prefix], "LM attention: text tokens × image prefix", "prefix token", "text token"
    )


@torch.no_grad()
def memory_addressing(model, batch: dict[str, torch.Tensor], row: int = 0) -> Figure:
    """Addressing weights w (episode steps × slots) of row `row`'s episode against the memory it wrote."""
    weights = model.memory_addresses(
        batch["episode_input_ids"],
        batch["episode_attention_mask"],
        batch.get("episode_pixel_values"),
        batch.get("episode_mask"),
    )[:, row]  # (E, K)
    return _heatmap(weights, "memory addressing: episode step × slot", "slot", "episode step", cmap="coolwarm")


@torch.no_grad()
def image_text_similarity(model, batch: dict[str, torch.Tensor]) -> Figure:
    """Cosine similarity of every image (y) with every text (x) of the batch's rows that hold an image."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with_image = (ids == model.config.image_token_id).any(1)
    images, texts = model.embed_images_and_texts(batch["pixel_values"], ids[with_image], mask[with_image])
    return _heatmap(images @ texts.T, "image–text cosine similarity (diagonal: pairs)", "text", "image")


def figures_for(model, batch: dict[str, torch.Tensor]) -> dict[str, Figure]:
    """Every figure the batch allows: attention and similarity need images, addressing needs episodes."""
    figures = {}
    if "pixel_values" in batch:
        figures["text_prefix_attention"] = text_prefix_attention(model, batch)
        figures["image_text_similarity"] = image_text_similarity(model, batch)
    if "episode_input_ids" in batch:
        figures["memory_addressing"] = memory_addressing(model, batch)
    return figures
