"""What a Hugging Face user's script does next (issue 12): a plain `Trainer` with evaluation and `compute_metrics`,
TRL's SFT collator and `assistant_only_loss`, gradient checkpointing's error, eval progress bars. (Labelled
batches, processor kwargs and chat stops: test_processor.py; `AutoModel`: test_remote_code.py.)"""

import io

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from microvlm import MicroVLMConfig, MicroVLMForCausalLM
from microvlm.eval.cli import batches
from microvlm.processing_microvlm import MicroVLMDataCollator
from microvlm.train.trainer import MicroVLMTrainer

from .test_processor import chat_rows, qa_rows


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
