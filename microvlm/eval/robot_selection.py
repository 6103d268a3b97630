"""Robot-selection accuracy of an EmberVLM (a MicroVLM with the reasoning module) on the built-in set, beside the
baselines a model has to beat: the majority class of the training split and the best rule that reads one attribute
(each value of one attribute mapped to its most frequent robot in train).

Two readings of the model: the answer head's argmax (`answer_logits` of the reasoning module, read at the last
prompt token), and the greedy generated text (correct when it starts with the right robot's name).
"""

import logging
from collections import Counter
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from ..data.collator import MicroVLMCollator
from ..data.robot_selection import ATTRIBUTES, ROBOTS


logger = logging.getLogger(__name__)


def majority_baseline(train: datasets.Dataset, test: datasets.Dataset) -> float:
    """Accuracy on `test` of always answering the most frequent robot of `train`."""
    majority = Counter(train["answer"]).most_common(1)[0][0]
    return sum(answer == majority for answer in test["answer"]) / len(test)


def single_attribute_baselines(train: datasets.Dataset, test: datasets.Dataset) -> dict[str, float]:
    """Per attribute: accuracy on `test` of the rule "this value of the attribute → its most frequent robot in
    `train`", the best a model reading one attribute (one keyword) can do."""
    accuracies = {}
    for attribute in ATTRIBUTES:
        by_value: dict[Any, Counter] = {}
        for value, answer in zip(train[attribute], train["answer"]):
            by_value.setdefault(value, Counter())[answer] += 1
        rule = {value: counts.most_common(1)[0][0] for value, counts in by_value.items()}
        hits = sum(rule.get(value) == answer for value, answer in zip(test[attribute], test["answer"]))
        accuracies[attribute] = hits / len(test)
    return accuracies


@torch.no_grad()
def robot_selection_accuracy(
    model, processor, dataset: datasets.Dataset, batch_size: int = 64, max_new_tokens: int = 8
) -> dict[str, float]:
    """{"answer_head": accuracy of argmax `answer_logits`, "generated": accuracy of the greedy text, "mean_steps":
    reasoning steps taken on average} of `model` on the robot-selection rows of `dataset`."""
    if model.reasoning_head is None:
        raise ValueError("robot_selection_accuracy needs a model with the reasoning module (config.use_reasoning)")
    collator = MicroVLMCollator(processor, prompts_only=True, max_length=128)
    model.eval()
    head_hits = text_hits = steps = 0
    for start in tqdm(range(0, len(dataset), batch_size), desc="robot selection", leave=False):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(model.device) for k, v in collator(rows).items() if k != "scope_targets"}
        labels = batch.pop("answer_targets")
        output = model(**batch)
        head_hits += int((output.answer_logits.argmax(-1) == labels).sum())
        steps += int(output.reasoning_num_steps.sum())
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        texts = processor.tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        text_hits += sum(text.strip().startswith(row["answer"]) for text, row in zip(texts, rows))
    return {
        "answer_head": head_hits / len(dataset),
        "generated": text_hits / len(dataset),
        "mean_steps": steps / len(dataset),
        "chance": 1 / len(ROBOTS),
    }
