"""Training on the HF Trainer: stages, logged loss terms, gradient flow, resume, 4-bit QLoRA, TRL, 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from microvlm import MicroVLMConfig, MicroVLMForCausalLM
from microvlm.train.cli import build_trainer, freeze_for_stage, main, read_config

from .test_remote_code import run_isolated


SMALL = [
    "--num_train",
    "64",
    "--num_validation",
    "16",
    "--num_test",
    "0",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "8",
    "--logging_steps",
    "2",
    "--eval_steps",
    "4",
    "--save_steps",
    "4",
    "--gradient_flow_steps",
    "2",
    "--visualisation_steps",
    "4",
    "--dataloader_num_workers",
    "0",
]


def logged(trainer_dir: Path) -> list[dict]:
    return json.loads((trainer_dir / "trainer_state.json").read_text())["log_history"]


def test_two_stage_demo_recipe_runs_logs_every_term_and_reloads_with_remote_code(tmp_path):
    stage1, stage2 = main(
        ["--stage", "both", "--recipe", "demo", "--max_steps", "4", "--output_dir", str(tmp_path), *SMALL]
        + ["--colour_free_start_step", "0"]  # the demo adds the colour-free term later than step 4
    )
    first = [entry for entry in logged(Path(stage1)) if "lm_loss" in entry]
    assert first and all("alignment_loss" in e and "grad_norm/adapter" in e for e in first)
    assert all(e["colour_free_loss"] > 0 and e["colour_free_kl"] >= 0 for e in first)
    assert all(e["grad_norm/vision"] > 0 for e in first)  # the demo trains its random tiny tower in stage 1
    second = [entry for entry in logged(Path(stage2)) if "lm_loss" in entry]
    for term in (
        "memory_kl",
        "addressing_kl",
        "memory_step_loss",
        "scope_gate",
        "scope_loss",
        "grad_norm/memory",
        "grad_norm/scope_net",
    ):
        assert all(term in e for e in second), term
    assert all(e["grad_norm/vision"] == 0 and e["grad_norm/memory"] > 0 for e in second)  # stage 2 freezes the tower
    assert any("eval_lm_loss" in e for e in logged(Path(stage2)))
    assert (Path(stage2) / "gradient_flow.jsonl").is_file()
    pictures = {p.name.split("_", 1)[1] for p in (Path(stage2) / "visualisations").glob("*.png")}
    assert pictures == {"text_prefix_attention.png", "image_text_similarity.png", "memory_addressing.png"}
    script = """
import sys, torch
sys.modules["microvlm"] = None
from transformers import AutoModelForCausalLM, AutoProcessor
from PIL import Image
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
inputs = processor(images=[Image.new("RGB", (64, 64), "red")], text=[""])
assert model.generate(**inputs, max_new_tokens=3, min_new_tokens=3).shape[1] == inputs["input_ids"].shape[1] + 3
"""
    (tmp_path / "elsewhere").mkdir()
    run_isolated(script, stage2, cwd=tmp_path / "elsewhere")


@pytest.mark.parametrize(
    ("stage", "expected"),
    [("stage1", {"adapter", "alignment"}), ("stage2", {"adapter", "alignment", "memory", "scope_net", "language"})],
)
def test_stage_configs_freeze_what_the_seed_says(stage, expected):
    text = {k: v for k, v in MicroVLMConfig.from_preset("tiny").text_config.to_dict().items() if k != "layer_types"}
    config = MicroVLMConfig.from_preset("tiny", text_config={**text, "num_hidden_layers": 6})
    model = MicroVLMForCausalLM(config)
    values = read_config(stage)
    counts = freeze_for_stage(model, values["train_groups"], values["trainable_lm_layers"])
    assert set(counts) == expected
    layers = model.model.language_model.layers
    trained = [any(p.requires_grad for p in layer.parameters()) for layer in layers]
    assert trained == [False] * (6 - values["trainable_lm_layers"]) + [True] * values["trainable_lm_layers"]
    assert not model.model.alignment.log_logit_scale.requires_grad  # τ fixed unless the config makes it learnable
    assert not model.get_input_embeddings().weight.requires_grad


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_a_resumed_run_reaches_the_weights_of_an_uninterrupted_one(tmp_path):
    args = [*SMALL, "--recipe", "demo", "--max_steps", "6", "--save_steps", "3", "--eval_strategy", "no"]
    whole = build_trainer("stage2", [*args, "--output_dir", str(tmp_path / "whole")], "demo")
    whole.train()
    interrupted = build_trainer("stage2", [*args, "--output_dir", str(tmp_path / "parts")], "demo")
    interrupted.add_callback(StopAt(3))
    interrupted.train()
    assert interrupted.state.global_step == 3
    resumed = build_trainer("stage2", [*args, "--output_dir", str(tmp_path / "parts")], "demo")
    resumed.train(resume_from_checkpoint=str(tmp_path / "parts" / "checkpoint-3"))
    # Same data order, same RNG states (restored from the checkpoint), same optimizer state: on one CPU thread
    # the runs are identical up to float32 reduction order, hence the 1e-6 tolerance.
    expected = whole.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_qlora_on_nf4_backbones_trains_on_cpu(tmp_path):
    import bitsandbytes as bnb

    trainer = build_trainer(
        "stage1",
        [
            "--recipe",
            "demo",
            "--max_steps",
            "2",
            "--load_in_4bit",
            "--lora_rank",
            "4",
            "--eval_strategy",
            "no",
            "--output_dir",
            str(tmp_path),
            *SMALL,
        ],
        "demo",
    )
    model = trainer.model
    quantised = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert any("language_model" in n and "q_proj" in n for n in quantised)
    # Every Linear of both backbones is NF4 (bitsandbytes quantises Linear layers only: a convolutional tower's
    # convolutions stay in full precision, frozen).
    backbone_linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (".vision_tower." in name or ".language_model." in name)
        and "lora_" not in name
    ]
    assert backbone_linears and set(backbone_linears) <= set(quantised)
    assert not any(".adapter." in n or "alignment" in n for n in quantised)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapter." in n and p.requires_grad}
    assert lora and adapter
    trainer.train()
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in lora.items())
    assert any(not torch.equal(after[n], p) for n, p in adapter.items())
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_trl_sft_trainer_takes_the_vision_language_path(tmp_path):
    from trl import SFTConfig, SFTTrainer

    from microvlm import MicroVLMProcessor
    from microvlm.data.synthetic_shapes import build_synthetic_dataset

    torch.manual_seed(0)
    model = MicroVLMForCausalLM(MicroVLMConfig.from_preset("tiny"))
    samples = build_synthetic_dataset(16, 0, 0, kinds=("qa",))["train"]
    conversations = samples.map(
        lambda s: {
            "images": [s["image"]],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["text"]}]},
                {"role": "assistant", "content": [{"type": "text", "text": s["answer"]}]},
            ],
        },
        remove_columns=samples.column_names,
    )
    config = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to="none",
        logging_steps=1,
        max_length=None,
        bf16=False,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=conversations, processing_class=MicroVLMProcessor.from_preset("tiny")
    )
    assert type(trainer.data_collator).__name__ == "DataCollatorForVisionLanguageModeling"
    before = model.model.adapter.queries.detach().clone()
    trainer.train()
    assert not torch.equal(model.model.adapter.queries, before)  # images reached the loss
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


@pytest.mark.slow
def test_two_cpu_processes_stay_in_sync(tmp_path):
    worker = Path(__file__).with_name("distributed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(worker),
        str(tmp_path),
        *SMALL,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    sums = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert sums[0]["world_size"] == sums[1]["world_size"] == 2
    assert sums[0]["steps"] == sums[1]["steps"] == 3
    for name, tensor in sums[0]["trainable"].items():
        assert torch.equal(tensor, sums[1]["trainable"][name]), name
    assert any(not torch.equal(t, sums[0]["initial"][n]) for n, t in sums[0]["trainable"].items())


def test_4bit_falls_back_to_full_precision_with_one_warning_on_unsupported_devices(caplog):
    from microvlm.train.quantization import nf4_quantization_config

    with caplog.at_level("WARNING"):
        assert nf4_quantization_config("meta") is None
    assert len(caplog.records) == 1 and "full precision" in caplog.records[0].getMessage()
    config = nf4_quantization_config("cpu")
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float32


def test_tiny_m_trains_one_step_per_stage_through_the_command_line(tmp_path):
    command = [sys.executable, "-m", "microvlm.train", "--preset", "tiny-m", "--stage", "both", "--recipe", "test"]
    options = ["--max_steps", "1", "--logging_steps", "1", "--trainable_vision_layers", "1"]  # after SMALL: they win
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [*command, *SMALL, *options, "--output_dir", str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (next(e for e in logged(tmp_path / stage) if "lm_loss" in e) for stage in ("stage1", "stage2"))
    assert "alignment_loss" in first and first["grad_norm/vision"] > 0  # the last ResNet stage trains
    assert second["memory_reconstruction_loss"] >= 0 and "scope_loss" in second
    assert MicroVLMForCausalLM.from_pretrained(tmp_path / "stage2").config.text_config.model_type == "bitnet"


def test_microvlm_m_recipe_freezes_the_first_8_deit_blocks_and_all_but_the_last_4_lm_layers():
    with torch.device("meta"):
        model = MicroVLMForCausalLM(MicroVLMConfig.from_preset("microvlm-m"))
    recipe = read_config("microvlm-m")["all"]
    freeze_for_stage(
        model, read_config("stage1")["train_groups"], recipe["trainable_lm_layers"], recipe["trainable_vision_layers"]
    )
    trained = [any(p.requires_grad for p in block.parameters()) for block in model.model.vision_tower.layers]
    assert trained == [False] * 8 + [True] * 4
    trained = [any(p.requires_grad for p in layer.parameters()) for layer in model.model.language_model.layers]
    assert trained == [False] * 26 + [True] * 4
