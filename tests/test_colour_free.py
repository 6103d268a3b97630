"""The colour-free consistency term (`microvlm.train.colour_free`) against batches built from the texts without
their colour word, and against a hand-computed KL."""

import pytest
import torch
from transformers import TrainingArguments

from microvlm import MicroVLMConfig, MicroVLMForCausalLM
from microvlm.data.collator import IGNORE_INDEX, MicroVLMCollator
from microvlm.data.synthetic_shapes import COLOURS, build_synthetic_dataset
from microvlm.train.cli import DataArguments, RunArguments, colour_free_settings
from microvlm.train.colour_free import ColourFreeConsistency, colour_free_terms, consistency_kl, remove_colour_words
from microvlm.train.trainer import MicroVLMTrainer


def rows(texts_and_answers: list[tuple[str, str]]) -> list[dict]:
    """Built-in rows (one image each) with these texts: ("caption", "") or (question, answer)."""
    base = build_synthetic_dataset(num_train=1, num_validation=0, num_test=0, kinds="caption")["train"][0]
    return [
        {**base, "kind": "qa" if answer else "caption", "text": text, "answer": answer}
        for text, answer in texts_and_answers
    ]


def colour_ids(processor) -> torch.Tensor:
    return torch.tensor([processor.tokenizer(" " + c, add_special_tokens=False).input_ids[0] for c in COLOURS])


BATCH = [
    ("two red circles on the left", ""),
    ("what shape is shown?", "circle"),
    ("what colour are the shapes?", "red"),
    ("one blue star at the top", ""),
]
WITHOUT_COLOUR = [("two circles on the left", ""), ("what shape is shown?", "circle"), ("one star at the top", "")]


def test_branch_b_is_each_text_without_its_colour_word_left_padded_and_colour_answers_left_out(processor):
    collator = MicroVLMCollator(processor)
    batch = collator(rows(BATCH))
    branch = remove_colour_words(
        batch["input_ids"], batch["attention_mask"], batch["labels"], colour_ids(processor), collator.pad_id
    )
    assert branch.rows.tolist() == [0, 1, 3]  # the colour question has nothing to answer without colour
    width = batch["input_ids"].shape[1]
    for kept, reference_row in zip(range(3), rows(WITHOUT_COLOUR)):
        reference = collator([reference_row])  # one row: no padding
        n = reference["input_ids"].shape[1]
        assert branch.input_ids.shape[1] == width
        torch.testing.assert_close(branch.input_ids[kept, -n:], reference["input_ids"][0])
        torch.testing.assert_close(branch.labels[kept, -n:], reference["labels"][0])
        assert branch.attention_mask[kept, -n:].all() and not branch.attention_mask[kept, :-n].any()
        assert (branch.labels[kept, :-n] == IGNORE_INDEX).all()
    # The tokens after the colour word keep their columns: from first_shared on, A and B hold the same tokens.
    for kept, row in zip(range(3), (0, 1, 3)):
        start = int(branch.first_shared[kept])
        torch.testing.assert_close(branch.input_ids[kept, start:], batch["input_ids"][row, start:])
    assert branch.first_shared[1] == 0  # no colour word: every column is shared


def test_branch_b_needs_left_padding(processor):
    batch = MicroVLMCollator(processor)(rows(BATCH))
    right = {
        name: tensor.flip(1) for name, tensor in batch.items() if name in ("input_ids", "attention_mask", "labels")
    }
    with pytest.raises(ValueError, match="left-padded"):
        remove_colour_words(right["input_ids"], right["attention_mask"], right["labels"], colour_ids(processor), 0)


def test_consistency_kl_is_the_mean_kl_from_b_to_a_over_the_shared_labelled_tokens():
    generator = torch.Generator().manual_seed(0)
    logits_a = torch.randn(2, 6, 11, generator=generator, requires_grad=True)
    logits_b = torch.randn(2, 6, 11, generator=generator, requires_grad=True)
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 4, 5, 6, 7], [IGNORE_INDEX, 1, 2, 3, IGNORE_INDEX, IGNORE_INDEX]]
    )
    first_shared = torch.tensor([4, 0])
    # Row 0 compares the columns predicting tokens 4 and 5 (columns 3, 4); row 1 those predicting 1, 2, 3 (0, 1, 2).
    pairs = [(0, 3), (0, 4), (1, 0), (1, 1), (1, 2)]
    expected = sum(
        torch.nn.functional.kl_div(
            logits_a[r, c].log_softmax(-1), logits_b[r, c].log_softmax(-1), log_target=True, reduction="sum"
        )
        for r, c in pairs
    ) / len(pairs)
    kl = consistency_kl(logits_a, logits_b, labels, first_shared)
    torch.testing.assert_close(kl, expected)
    kl.backward()
    assert logits_a.grad.abs().sum() > 0 and logits_b.grad is None  # B is the target: no gradient through it


def test_the_term_adds_the_lm_loss_without_colour_and_the_kl_to_it(processor, tmp_path):
    """LM(B) is the model's LM loss (not its InfoNCE) on the colour-free texts with the tower's RGB stream giving
    zeros, which a forward hook on the RGB stream reproduces independently of `without_rgb`."""
    torch.manual_seed(0)
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny")).train()
    collator = MicroVLMCollator(processor)
    batch = collator(rows(BATCH))
    settings = ColourFreeConsistency(
        weight=0.5, start_step=0, colour_ids=colour_ids(processor), pad_id=collator.pad_id
    )
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = MicroVLMTrainer(model=model, args=args, colour_free=settings)
    total = trainer.compute_loss(model, batch)

    loss_a = model(**batch).loss
    reference = collator(rows(WITHOUT_COLOUR))
    reference["pixel_values"] = batch["pixel_values"][[0, 1, 3]]
    tower = model.model.vision_tower
    hook = tower.rgb.register_forward_hook(
        lambda module, args, output: type(output)(
            last_hidden_state=torch.zeros_like(output.last_hidden_state), pooler_output=output.pooler_output
        )
    )
    with torch.no_grad():
        loss_b = model(**reference).lm_loss
    hook.remove()
    sums = trainer._term_sums["train"]
    torch.testing.assert_close(torch.tensor(sums["colour_free_loss"]), loss_b.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        total, loss_a + 0.5 * (loss_b + torch.tensor(sums["colour_free_kl"])), rtol=1e-4, atol=1e-5
    )
    assert sums["colour_free_kl"] > 0


def test_rows_without_an_image_stay_out_of_branch_b(processor):
    """A row without an image (a recall question, as stage 2 mixes in) sends no pixels: branch B keeps the image
    rows only, each with its own image, so the terms are those of the same batch without that row."""
    torch.manual_seed(0)
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny")).eval()
    collator = MicroVLMCollator(processor)
    settings = ColourFreeConsistency(
        weight=1.0, start_step=0, colour_ids=colour_ids(processor), pad_id=collator.pad_id
    )
    recall = {"kind": "recall", "text": "what shape was in image 2?", "answer": "circle"}

    def terms(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collator(samples)
        return colour_free_terms(model, batch, model(**batch).logits, settings)

    with torch.no_grad():
        torch.testing.assert_close(terms([recall, *rows(BATCH)]), terms(rows(BATCH)))


@pytest.mark.parametrize(
    ("preset", "dataset", "message"),
    [
        ("tiny-ember", "synthetic", "needs a two-stream vision tower"),
        ("tiny", "robot_selection", "needs the built-in set"),
    ],
)
def test_the_term_refuses_towers_and_data_it_cannot_take_naming_the_flag(processor, preset, dataset, message):
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset(preset))
    run_args, data_args = RunArguments(colour_free_weight=1.0), DataArguments(dataset=dataset)
    with pytest.raises(ValueError, match=message + ".*--colour_free_weight 0"):
        colour_free_settings(run_args, data_args, model, processor, pad_id=0)
    assert colour_free_settings(RunArguments(), data_args, model, processor, pad_id=0) is None
