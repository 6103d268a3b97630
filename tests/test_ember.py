"""EmberVLM (issue 14): the tiny-ember preset (GPT-2 LM), its reasoning module, distillation term, robot-selection
set and four training stages. Its generation and remote-code round trip run with the other families (`family_model`
in conftest.py); robot-selection accuracy is a learning goal, measured by scripts/ember_demo.py (README)."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from microvlm import MicroVLMConfig, MicroVLMForCausalLM, MicroVLMProcessor
from microvlm.data.collator import MicroVLMCollator
from microvlm.data.robot_selection import (
    ALL_TASKS,
    PHRASES,
    ROBOTS,
    build_robot_selection_dataset,
    robot_for,
)
from microvlm.reasoning_head import ReasoningHead, reasoning_losses
from microvlm.train.cli import main

from .conftest import make_inputs
from .test_generation import generate_greedy, greedy_without_cache
from .test_training import SMALL, logged


EMBER_STAGES = ("stage1", "stage2", "robot_selection", "reasoning_heads", "reasoning")


@pytest.fixture
def ember_model() -> MicroVLMForCausalLM:
    torch.manual_seed(0)
    return MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny-ember")).eval()


def test_tiny_ember_builds_from_its_preset_with_a_gpt2_lm_and_the_reasoning_module(ember_model):
    config = ember_model.config
    assert config.text_config.model_type == "gpt2" and config.use_reasoning
    assert ember_model.lm_head.weight is ember_model.model.language_model.wte.weight  # tied, GPT-2's name
    assert isinstance(ember_model.model.adapter.mlp[1], torch.nn.ReLU)
    out = ember_model(**make_inputs(config, [5, 2]))
    assert out.answer_logits.shape == (2, config.reasoning_num_answers)
    assert out.reasoning_steps.shape == (2, config.reasoning_max_steps, config.text_config.hidden_size)


@torch.no_grad()
def test_gpt2_generate_with_memory_equals_a_no_cache_greedy_loop():
    """The memory's key/values sit in front of GPT-2's text in the cache; its learned positions count the text
    alone, so the cached decode must equal recomputing everything."""
    torch.manual_seed(0)
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny-ember", use_memory=True)).eval()
    inputs = make_inputs(model.config, [6, 3])
    reference = greedy_without_cache(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], 6)
    assert torch.equal(generate_greedy(model, inputs, 6), reference)


def head_with_steps_that_add_one(threshold: float) -> ReasoningHead:
    """A head whose step adds 1 to feature 0 (h_s = h_0 + s·e_0) and whose validator scores
    c_s = σ(4·relu(h_s[0]) − 10): hand-computable stopping."""
    config = MicroVLMConfig.from_preset(
        "tiny-ember", reasoning_max_steps=4, reasoning_consistency_threshold=threshold, reasoning_dropout=0.0
    )
    head = ReasoningHead(config).eval()
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.zero_()
                module.bias.zero_()
        head.step[-1].bias[0] = 1.0
        head.validator[0].weight[0, 0] = 1.0  # the current step's feature 0
        head.validator[-1].weight[0, 0] = 4.0
        head.validator[-1].bias[0] = -10.0
    return head


@torch.no_grad()
def test_reasoning_stops_each_row_when_its_consistency_reaches_the_threshold():
    head = head_with_steps_that_add_one(threshold=0.5)  # c_s ≥ 0.5 ⇔ h_0[0] + s ≥ 2.5
    start = torch.zeros(3, head.step[0].in_features)
    start[:, 0] = torch.tensor([2.0, 0.0, -5.0])  # stop after step 1, step 3, never (4 steps)
    out = head(start)
    assert out.num_steps.tolist() == [1, 3, 4]
    for row, (h0, taken) in enumerate(zip([2.0, 0.0, -5.0], [1, 3, 4])):
        expected = [h0 + min(s, taken) for s in range(1, 5)]  # a stopped row repeats its last step
        assert torch.allclose(out.steps[row, :, 0], torch.tensor(expected))
        scores = torch.sigmoid(4 * torch.relu(torch.tensor(expected)) - 10)
        assert torch.allclose(out.consistency[row], scores)
        assert torch.equal(out.answer_logits[row], out.step_logits[row, taken - 1])


@torch.no_grad()
def test_a_row_reasons_the_same_alone_as_in_a_batch(ember_model):
    """Per-row early stopping: the batched loop equals running each row by itself (random head, varied stops)."""
    torch.manual_seed(1)
    head = ember_model.reasoning_head
    states = 3 * torch.randn(6, head.step[0].in_features)
    head.threshold = float(head(states).consistency[:, 0].median())  # half the rows stop at step 1
    batched = head(states)
    assert len(set(batched.num_steps.tolist())) > 1
    for row in range(6):
        alone = head(states[row : row + 1])
        assert torch.equal(alone.num_steps, batched.num_steps[row : row + 1])
        assert torch.allclose(alone.steps, batched.steps[row : row + 1], atol=1e-6)
        assert torch.allclose(alone.answer_logits, batched.answer_logits[row : row + 1], atol=1e-6)


def test_reasoning_losses_equal_an_independent_computation():
    head = head_with_steps_that_add_one(threshold=0.5)
    torch.manual_seed(2)
    with torch.no_grad():
        head.answer[-1].weight.normal_()  # answers that depend on the steps
        head.answer[0].weight.normal_()
    start = torch.randn(3, head.step[0].in_features)
    start[:, 0] = torch.tensor([2.0, 0.0, -5.0])
    labels = torch.tensor([1, -100, 4])
    out = head(start)
    answer, consistency = reasoning_losses(out, labels)
    # Rows 0 and 2 are labelled; they took 1 and 4 steps.
    expected_answer = (
        -(torch.log_softmax(out.answer_logits[0], -1)[1] + torch.log_softmax(out.answer_logits[2], -1)[4]) / 2
    )
    terms = []
    for row, taken in ((0, 1), (2, 4)):
        for step in range(taken):
            target = float(int(out.step_logits[row, step].argmax()) == int(labels[row]))
            c = out.consistency[row, step]
            terms.append(-(target * torch.log(c) + (1 - target) * torch.log(1 - c)))
    assert torch.allclose(answer, expected_answer, atol=1e-6)
    assert torch.allclose(consistency, torch.stack(terms).mean(), atol=1e-6)


@torch.no_grad()
def test_distillation_term_is_tau_squared_kl_of_teacher_to_student_on_labelled_positions(ember_model):
    inputs = make_inputs(ember_model.config, [6, 4], seed=3)
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100  # the last 3 tokens are targets
    vocab = ember_model.config.text_config.vocab_size
    teacher = torch.randn(*labels.shape, vocab, generator=torch.Generator().manual_seed(5))
    weight, tau = 0.7, 2.0
    ember_model.config.distillation_weight, ember_model.config.distillation_temperature = weight, tau
    with_teacher = ember_model(**inputs, labels=labels, teacher_logits=teacher)
    without = ember_model(**inputs, labels=labels)
    kl = []
    for row, position in itertools.product(range(2), range(labels.shape[1] - 1)):
        if labels[row, position + 1] == -100:
            continue
        p = torch.softmax(teacher[row, position] / tau, -1)
        q = torch.softmax(with_teacher.logits[row, position] / tau, -1)
        kl.append((p * (p.log() - q.log())).sum())
    expected = tau**2 * torch.stack(kl).mean()
    assert len(kl) == 6
    assert torch.allclose(with_teacher.distillation_loss, expected, atol=1e-5)
    assert torch.allclose(with_teacher.loss - without.loss, weight * expected, atol=1e-5)


@torch.no_grad()
def test_the_answer_head_reads_the_prompt_so_the_target_text_cannot_leak_into_it(ember_model):
    processor = MicroVLMProcessor.from_preset("tiny-ember")
    sample = build_robot_selection_dataset(1, 0, 0, image_size=64)["train"][0]
    other = {**sample, "answer": "underwater robot" if sample["answer"] != "underwater robot" else "drone"}
    collator = MicroVLMCollator(processor)
    batch = collator([sample, other])
    assert batch["answer_targets"].tolist() == [sample["label"]] * 2
    assert not torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    out = ember_model(**{k: v for k, v in batch.items() if k != "scope_targets"})
    assert torch.allclose(out.answer_logits[0], out.answer_logits[1], atol=1e-5)
    prompt_only = MicroVLMCollator(processor, prompts_only=True)([sample])
    alone = ember_model(**{k: v for k, v in prompt_only.items() if k not in ("scope_targets", "answer_targets")})
    assert torch.allclose(alone.answer_logits[0], out.answer_logits[0], atol=1e-5)  # as at inference


def test_robot_set_is_deterministic_balanced_and_labelled_by_the_rule():
    first = build_robot_selection_dataset(50, 10, 10, image_size=32, seed=3)
    again = build_robot_selection_dataset(50, 10, 10, image_size=32, seed=3)
    for split in ("train", "test"):
        assert first[split].to_dict() == again[split].to_dict()
    assert first["train"]["text"] != build_robot_selection_dataset(50, 0, 0, image_size=32, seed=4)["train"]["text"]
    train = first["train"]
    assert [train["answer"].count(robot) for robot in ROBOTS] == [10] * 5
    for row in train:
        assert row["answer"] == ROBOTS[row["label"]] == robot_for(row)
        for attribute in ("payload", "height", "terrain", "setting"):  # every attribute is said in the text
            assert any(phrase in row["text"] for phrase in PHRASES[attribute][row[attribute]]), attribute
        assert row["hands"] == any(phrase and phrase in row["text"] for phrase in PHRASES["hands"][True])


def test_robot_rule_matches_its_documented_decision_list_and_is_not_one_attribute():
    def documented(task):
        if task["setting"] == "underwater":
            return "underwater robot"
        if task["hands"]:
            return "humanoid"
        if task["height"] == "high" and task["payload"] in ("none", "light"):
            return "drone"
        return "legged robot" if task["terrain"] != "flat" else "wheeled robot"

    assert all(robot_for(task) == documented(task) for task in ALL_TASKS)
    assert {robot_for(task) for task in ALL_TASKS} == set(ROBOTS)
    for attribute in ("terrain", "payload", "height", "hands"):  # no value of these fixes the robot
        for value in {task[attribute] for task in ALL_TASKS}:
            assert len({robot_for(t) for t in ALL_TASKS if t[attribute] == value}) > 1, (attribute, value)


def test_each_ember_stage_trains_one_step_through_the_command_line(tmp_path):
    options = ["--max_steps", "1", "--logging_steps", "1", "--gradient_flow_steps", "1", "--eval_strategy", "no"]
    folders = main(
        ["--recipe", "ember", "--stage", ",".join(EMBER_STAGES), "--output_dir", str(tmp_path), *SMALL, *options]
    )
    assert [Path(folder).name for folder in folders] == list(EMBER_STAGES)
    entries = {stage: next(e for e in logged(Path(f)) if "lm_loss" in e) for stage, f in zip(EMBER_STAGES, folders)}
    assert entries["stage1"]["grad_norm/vision"] == 0 and entries["stage1"]["grad_norm/language"] > 0
    assert "alignment_loss" in entries["stage1"] and entries["stage2"]["grad_norm/vision"] > 0
    for stage in ("robot_selection", "reasoning_heads", "reasoning"):
        assert "reasoning_answer_loss" in entries[stage] and "reasoning_consistency_loss" in entries[stage], stage
        assert entries[stage]["grad_norm/reasoning"] > 0
    assert entries["reasoning_heads"]["grad_norm/language"] == 0 and entries["reasoning"]["grad_norm/language"] > 0
    saved = json.loads((Path(folders[-1]) / "config.json").read_text())
    assert saved["use_reasoning"] and saved["text_config"]["model_type"] == "gpt2"


@pytest.mark.parametrize(
    ("preset", "layers", "reasoning"),
    [("ember-base", 6, False), ("ember-lite", 4, False), ("ember-reasoning", 6, True)],
)
def test_reference_ember_presets_build_on_the_meta_device_with_tinyllm_counts(preset, layers, reasoning):
    pytest.importorskip("microvlm.repvit", reason="the RepViT tower (issue 14's vision part) is not merged yet")
    with torch.device("meta"):
        model = MicroVLMForCausalLM(MicroVLMConfig.from_preset(preset))
    config = model.config
    assert config.vision_config.model_type == "repvit" and config.num_image_tokens == 8
    d, vocab, positions = 384, 50262, 1024
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    lm = model.model.language_model
    # GPT-2 with n_inner = 4d: per layer qkv d·3d+3d, out d²+d, MLP d·4d+4d and 4d·d+d, two LayerNorms 4d.
    assert count(lm.h) == layers * (12 * d * d + 13 * d)
    assert count(lm.wte) + count(lm.wpe) == vocab * d + positions * d  # 19.30M + 0.39M; the LM head is tied
    if not reasoning:
        assert model.reasoning_head is None
        return
    step, validator, answer = (
        (d * 768 + 768 + 768 * d + d),
        (2 * d * 384 + 384 + 384 + 1),
        (d * 192 + 192 + 192 * 5 + 5),
    )
    assert count(model.reasoning_head) == step + validator + answer


def test_a_preset_processor_adds_its_added_tokens_in_order(monkeypatch):
    """The "ember-*" presets' vocabulary is GPT-2's + 5 tokens; the mechanism, offline, on the tiny tokenizer."""
    tiny = MicroVLMConfig.read_preset("tiny")
    vocabulary = len(MicroVLMProcessor.from_preset("tiny").tokenizer)
    added = ["<task>", "<reasoning>", "<answer>"]
    with_added = {**tiny, "processor": {**tiny["processor"], "added_tokens": added}}
    monkeypatch.setattr(MicroVLMConfig, "read_preset", classmethod(lambda cls, name: dict(with_added)))
    tokenizer = MicroVLMProcessor.from_preset("tiny").tokenizer
    assert tokenizer.convert_tokens_to_ids(added) == [vocabulary, vocabulary + 1, vocabulary + 2]
    assert tokenizer("<answer> drone", add_special_tokens=False)["input_ids"][0] == vocabulary + 2
