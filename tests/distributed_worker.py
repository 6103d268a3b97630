"""Run by test_training under `torch.distributed.run` (2 CPU processes, gloo): trains 3 stage-1 steps and saves
this rank's trainable weights, so the test can check both ranks hold the same ones."""

import sys

import torch

from microvlm.train import build_trainer

output, *extra = sys.argv[1:]
trainer = build_trainer(
    "stage1",
    [
        "--recipe",
        "demo",
        "--max_steps",
        "3",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--output_dir",
        output,
        *extra,
    ],
    "demo",
)
initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
trainer.train()
rank = trainer.args.process_index
trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
torch.save(
    {
        "world_size": trainer.args.world_size,
        "steps": trainer.state.global_step,
        "trainable": trainable,
        "initial": initial,
    },
    f"{output}/rank{rank}.pt",
)
