"""What a Hugging Face user's script does next (issue 12): a plain `Trainer` with evaluation and `compute_metrics`,
labelled batches from the processor, TRL's SFT collator and `assistant_only_loss`, processor kwargs, chat stops,
`AutoModel` and progress bars."""

import io

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import AutoModel, GenerationConfig, Trainer, TrainingArguments

from microvlm import MicroVLMConfig, MicroVLMForCausalLM, MicroVLMModel, MicroVLMProcessor
from microvlm.data.collator import MicroVLMCollator
from microvlm.eval.cli import batches
from microvlm.processing_microvlm import MicroVLMDataCollator
from microvlm.train.trainer import MicroVLMTrainer


@pytest.fixture(scope="module")
def processor() -> MicroVLMProcessor:
    return MicroVLMProcessor.from_preset("tiny")


def image(colour: str = "red") -> Image.Image:
    return Image.new("RGB", (64, 64), colour)


def qa_rows(count: int = 4) -> list[dict]:
    colours = ["red", "blue", "green", "yellow"]
    return [
        {"image": image(colours[i % 4]), "prompt": "what colour are the shapes?", "completion": colours[i % 4]}
        for i in range(count)
    ]


def chat_rows(count: int = 4) -> list[dict]:
    colours = ["red", "blue", "green", "yellow"]
    return [
        {
            "images": [image(colours[i % 4])],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": colours[i % 4]}]},
            ],
        }
        for i in range(count)
    ]


def training_args(tmp_path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        save_strategy="no",
    )


@pytest.mark.parametrize("trainer_class", [Trainer, MicroVLMTrainer])
def test_a_trainer_with_default_arguments_reports_eval_loss_and_calls_compute_metrics_with_logits(
    trainer_class, tiny_model, processor, tmp_path
):
    seen = []

    def compute_metrics(prediction) -> dict[str, float]:
        seen.append(prediction)
        return {"logit_rank": float(np.ndim(prediction.predictions))}

    trainer = trainer_class(
        model=tiny_model,
        args=training_args(tmp_path),
        train_dataset=qa_rows(),
        eval_dataset=qa_rows(),
        data_collator=MicroVLMDataCollator(processor),
        compute_metrics=compute_metrics,
    )
    assert trainer.label_names == ["labels"]  # the ScopeNet target is not taken for a label
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and metrics["eval_logit_rank"] == 3.0
    predictions = seen[0].predictions
    assert isinstance(predictions, np.ndarray)  # the logits alone, not a tuple of every output
    assert predictions.shape[0] == 4 and predictions.shape[-1] == tiny_model.config.text_config.vocab_size
    assert seen[0].label_ids.shape == predictions.shape[:2]


def test_processor_suffix_builds_the_built_in_collators_batch(processor):
    """(image, prompt, target) rows through the processor: the same ids and labels as the training collator."""
    samples = [
        {"kind": "qa", "image": image("red"), "text": "what colour are the shapes?", "answer": "red"},
        {"kind": "caption", "image": image("blue"), "text": "two blue circles on the left"},
    ]
    expected = MicroVLMCollator(processor)(samples)
    batch = processor(
        images=[s["image"] for s in samples],
        text=["what colour are the shapes?", ""],
        suffix=["red", "two blue circles on the left"],
    )
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(batch[key], expected[key]), key


def test_data_collator_labels_only_the_answer_of_chat_and_prompt_completion_rows(processor):
    for rows in (qa_rows(2), chat_rows(2)):
        batch = MicroVLMDataCollator(processor)(rows)
        labelled = batch["labels"] != -100
        assert not labelled[batch["input_ids"] == processor.image_token_id].any()
        assert not labelled[batch["attention_mask"] == 0].any()
        answers = processor.tokenizer.batch_decode(
            [ids[mask] for ids, mask in zip(batch["input_ids"], labelled)], skip_special_tokens=True
        )
        assert [a.strip() for a in answers] == ["red", "blue"]
    with pytest.raises(ValueError, match="expected 'messages' or 'prompt'"):
        MicroVLMDataCollator(processor)([{"question": "q", "answer": "a", "image": image()}])


def test_trl_sft_with_assistant_only_loss_trains_and_never_labels_image_placeholders(tiny_model, processor, tmp_path):
    trl = pytest.importorskip("trl")
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
    batch = collator(chat_rows(2))
    labelled = batch["labels"] != -100
    assert labelled.any() and not labelled[batch["input_ids"] == processor.image_token_id].any()
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        assistant_only_loss=True,
        gradient_checkpointing=False,  # SFTConfig's default (True) is refused by the memory stages
        max_length=None,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=tiny_model, args=config, train_dataset=Dataset.from_list(chat_rows(4)), processing_class=processor
    )
    assert np.isfinite(trainer.train().training_loss)


def test_gradient_checkpointing_with_the_memory_names_the_fix():
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny", use_memory=True)).train()
    model.gradient_checkpointing_enable()
    inputs = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[5, 6, 7]])}
    with pytest.raises(ValueError, match="gradient_checkpointing=False.*SFTConfig"):
        model(**inputs)


def test_processor_follows_processing_kwargs_and_takes_tensors(processor):
    plain = processor(images=[image()], text=["x"], do_normalize=False)["pixel_values"]
    assert plain.min() >= 0 and plain.max() <= 1
    nested = processor(images=[image()], text=["x"], images_kwargs={"do_normalize": False})["pixel_values"]
    assert torch.equal(plain, nested)
    padded = processor(images=[image()], text=["x"], text_kwargs={"padding": "max_length", "max_length": 20})
    assert padded["input_ids"].shape == (1, 20)
    tensor = torch.rand(3, 32, 32)
    from_tensor = processor(images=[tensor], text=["x"])["pixel_values"]
    from_array = processor(images=[(tensor.permute(1, 2, 0).numpy())], text=["x"])["pixel_values"]
    assert torch.equal(from_tensor, from_array)
    with pytest.raises(ValueError, match="raise max_length above 8"):
        processor(images=[image()], text=["hello there"], truncation=True, max_length=5)


def test_chat_generation_stops_at_the_turn_end(tiny_model, processor, tmp_path):
    turn_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    tiny_model.save_pretrained(tmp_path)
    assert turn_end in GenerationConfig.from_pretrained(tmp_path).eos_token_id
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[image()], text=[prompt])
    # A model that ends its turn at once: the reply must stop there, not run on to max_new_tokens.
    out = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=False, sequence_bias={(turn_end,): 100.0})
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == [turn_end]


def test_auto_model_is_the_body_without_lm_head(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    body = AutoModel.from_pretrained(tmp_path)
    assert type(body) is MicroVLMModel and not hasattr(body, "lm_head")


def test_eval_progress_bars_stay_off_in_logs_and_when_transformers_turns_them_off(monkeypatch):
    """Under a non-terminal stream, or with transformers' progress bars disabled, no bar is written."""
    from transformers.utils import logging as hf_logging

    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    assert list(batches(list(range(5)), 2, "rows")) == [[0, 1], [2, 3], [4]]
    hf_logging.disable_progress_bar()
    try:
        assert len(list(batches(list(range(5)), 2, "rows"))) == 3
    finally:
        hf_logging.enable_progress_bar()
    assert stream.getvalue() == ""
