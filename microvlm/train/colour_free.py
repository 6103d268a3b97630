"""Colour-free consistency: a training term that keeps the LM's reading of shape, count and position from
depending on colour, so that a colour–shape pair never seen in training is still named by its shape.

Why: trained on the built-in set, where each colour comes with four of the five shapes, the model learns to choose
among the shapes it saw with the image's colour (README: "What decides a held-out pair's shape"), although the
two-stream tower's contrast stream sees the same silhouette whatever the colour. The term asks, on every training
batch, that what the model predicts after the colour word be what it predicts with no colour at all:

    branch A: the batch as it is                        image (RGB + contrast)   "two red circles on the left"
    branch B: the tower's RGB stream off, and the       image (contrast only)    "two circles on the left"
              colour word taken out of the text

    term = LM(B) + KL( stop-gradient p_B ‖ p_A ), over the tokens after the colour word

LM(B), the next-token loss on branch B, teaches the model to describe an image without colour (the text of B is
true of what B sees); the KL pulls A's predictions of the shape, count and position words towards B's, which
cannot depend on colour. B's InfoNCE is left out: aligning colourless images with colourless captions in the
embedding space that A's alignment shares cost colour (README: "Where the colour comes in"). No image is
recoloured and no held-out pair is made: B only takes colour away. Rows whose colour word is the answer (a question
about colour) have nothing to predict without colour and are left out of B.

Batches are left-padded (`MicroVLMCollator`): dropping a row's colour token and padding it on the left by one
keeps every later token at the same index, so A's and B's logits line up column by column.
"""

from dataclasses import dataclass

import torch

from ..data.collator import IGNORE_INDEX
from ..modeling_microvlm import MicroVLMForCausalLM


@dataclass
class ColourFreeConsistency:
    """The term's settings for `MicroVLMTrainer`: total loss = the model's loss + weight · (LM(B) + KL) from
    optimiser step `start_step` on. colour_ids (C,): the token ids of the colour words; pad_id: the collator's."""

    weight: float
    start_step: int
    colour_ids: torch.LongTensor
    pad_id: int


@dataclass
class ColourFreeBatch:
    """Branch B of a batch. rows (R,): the batch rows it keeps; input_ids, attention_mask, labels (R, T);
    first_shared (R,): per row, the first column whose token A and B share after the removed colour word (0 for
    a row without one), so the logits at columns ≥ first_shared − 1 predict the same token in both."""

    rows: torch.LongTensor
    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    labels: torch.LongTensor
    first_shared: torch.LongTensor


def remove_colour_words(
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    labels: torch.LongTensor,
    colour_ids: torch.LongTensor,
    pad_id: int,
) -> ColourFreeBatch:
    """Branch B's text: each row's first labelled colour token removed and one pad added on the left.

    input_ids, attention_mask, labels: (B, T), left-padded; colour_ids: (C,) the token ids of the colour words.
    A row whose colour token is its last labelled token before the end of text (the answer to a colour question)
    is dropped; a row without a colour token is kept as it is. Raises if the batch is right-padded.
    """
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError(
            "remove_colour_words needs left-padded batches (MicroVLMCollator pads on the left): a row ends in padding"
        )
    labelled = labels != IGNORE_INDEX
    named = labelled & torch.isin(input_ids, colour_ids.to(input_ids.device))
    rows, ids, mask, targets, first_shared = [], [], [], [], []
    for row in range(input_ids.shape[0]):
        columns = named[row].nonzero().flatten()
        if len(columns) == 0:
            rows.append(row)
            ids.append(input_ids[row])
            mask.append(attention_mask[row])
            targets.append(labels[row])
            first_shared.append(0)
            continue
        column = int(columns[0])
        if int(labelled[row, column + 1 :].sum()) < 2:
            continue  # the colour word is the answer, followed by at most the end-of-text token
        keep = torch.arange(input_ids.shape[1], device=input_ids.device) != column
        rows.append(row)
        ids.append(torch.cat([input_ids.new_full((1,), pad_id), input_ids[row, keep]]))
        mask.append(torch.cat([attention_mask.new_zeros(1), attention_mask[row, keep]]))
        targets.append(torch.cat([labels.new_full((1,), IGNORE_INDEX), labels[row, keep]]))
        first_shared.append(column + 1)
    device = input_ids.device
    if not rows:
        empty = input_ids.new_zeros(0, input_ids.shape[1])
        return ColourFreeBatch(torch.zeros(0, dtype=torch.long, device=device), empty, empty, empty, empty[:, 0])
    return ColourFreeBatch(
        rows=torch.tensor(rows, device=device),
        input_ids=torch.stack(ids),
        attention_mask=torch.stack(mask),
        labels=torch.stack(targets),
        first_shared=torch.tensor(first_shared, device=device),
    )


def consistency_kl(
    logits_a: torch.Tensor, logits_b: torch.Tensor, labels_b: torch.Tensor, first_shared: torch.Tensor
) -> torch.Tensor:
    """Mean over the shared predicted tokens of KL(stop-gradient p_B ‖ p_A).

    logits_a, logits_b: (R, T, V) of the same rows; labels_b (R, T); first_shared (R,). Column t's logits predict
    token t + 1; they are compared where token t + 1 is labelled in B and t + 1 ≥ first_shared. Returns a scalar
    (0 when no column qualifies).
    """
    columns = torch.arange(labels_b.shape[1] - 1, device=labels_b.device)
    compared = (labels_b[:, 1:] != IGNORE_INDEX) & (columns[None] + 1 >= first_shared[:, None])
    if not bool(compared.any()):
        return logits_a.sum() * 0.0
    log_p_a = logits_a[:, :-1][compared].float().log_softmax(-1)
    log_p_b = logits_b[:, :-1][compared].float().log_softmax(-1).detach()
    return (log_p_b.exp() * (log_p_b - log_p_a)).sum(-1).mean()


def vision_tower(model: MicroVLMForCausalLM) -> torch.nn.Module:
    """The vision tower of a `MicroVLMForCausalLM`, also when PEFT wraps it (`--lora_rank`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.vision_tower


def colour_free_terms(
    model: MicroVLMForCausalLM, inputs: dict, logits_a: torch.Tensor, settings: ColourFreeConsistency
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the LM loss on branch B, KL(sg p_B ‖ p_A)) for a batch `inputs` whose branch-A logits (B, T, V) are
    `logits_a`; None when no row of the batch has a branch B. `model` has a two-stream tower.

    Only rows with an image enter B (a recall question, which has none, has no colour to take away); the images
    (N, 3, H, W) are those rows' in order, as the collator sends them.
    """
    with_image = (inputs["input_ids"] == model.config.image_token_id).any(1).nonzero().flatten()  # (N,)
    ids, mask, labels = (inputs[name][with_image] for name in ("input_ids", "attention_mask", "labels"))
    branch = remove_colour_words(ids, mask, labels, settings.colour_ids, settings.pad_id)
    if len(branch.rows) == 0:
        return None
    with vision_tower(model).without_rgb():
        outputs_b = model(
            input_ids=branch.input_ids,
            attention_mask=branch.attention_mask,
            pixel_values=inputs["pixel_values"][branch.rows],
            labels=branch.labels,
        )
    rows = with_image[branch.rows]
    kl = consistency_kl(logits_a[rows], outputs_b.logits, branch.labels, branch.first_shared)
    return outputs_b.lm_loss, kl
