"""Trainer callbacks: gradient flow per module group, periodic visualisations, memory state in checkpoints."""

import json
import logging
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..bitnet import set_quantisation_strength


logger = logging.getLogger(__name__)

# Module groups of MicroVLMForCausalLM, by parameter-name prefix.
MODULE_GROUPS = {
    "vision": ("model.vision_tower.",),
    "adapter": ("model.adapter.",),
    "alignment": ("model.alignment.",),
    "scope_net": ("model.memory.scope_net.",),
    "memory": ("model.memory.",),
    "language": ("model.language_model.", "lm_head."),
    "reasoning": ("reasoning_head.",),
}


def group_of(parameter_name: str) -> str:
    """The module group a parameter belongs to (PEFT's `base_model.model.` prefix is ignored)."""
    name = parameter_name.removeprefix("base_model.model.")
    for group, prefixes in MODULE_GROUPS.items():
        if name.startswith(prefixes):
            return group
    return "other"


def gradient_flow(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Per group: L2 norm of the gradients, and how many trainable / frozen parameters hold a non-zero gradient."""
    stats: dict[str, dict[str, float]] = {}
    for name, param in model.named_parameters():
        entry = stats.setdefault(
            group_of(name), {"grad_norm": 0.0, "trainable": 0, "trainable_with_grad": 0, "frozen_with_grad": 0}
        )
        has_grad = param.grad is not None and bool(param.grad.detach().abs().sum() > 0)
        if param.requires_grad:
            entry["trainable"] += 1
            entry["trainable_with_grad"] += int(has_grad)
        else:
            entry["frozen_with_grad"] += int(has_grad)
        if has_grad:
            entry["grad_norm"] += float(param.grad.detach().float().norm() ** 2)
    for entry in stats.values():
        entry["grad_norm"] = entry["grad_norm"] ** 0.5
    return stats


class GradientFlowCallback(TrainerCallback):
    """Every `every_n_steps` optimizer steps, records per-group gradient norms (to `gradient_flow.jsonl` in the
    output dir and to the training logs as `grad_norm/<group>`), and warns when a frozen group shows gradients or
    a trained group shows none."""

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = every_n_steps
        self.pending: dict[str, float] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every_n_steps:
            return
        stats = gradient_flow(model)
        for group, entry in stats.items():
            self.pending[f"grad_norm/{group}"] = round(entry["grad_norm"], 6)
            if entry["frozen_with_grad"]:
                logger.warning(
                    "gradient flow: frozen group %r has gradients on %d tensors", group, entry["frozen_with_grad"]
                )
            if entry["trainable"] and not entry["trainable_with_grad"]:
                logger.warning("gradient flow: trained group %r received no gradient", group)
        if state.is_world_process_zero:
            with open(Path(args.output_dir) / "gradient_flow.jsonl", "a") as file:
                file.write(json.dumps({"step": state.global_step, **stats}) + "\n")

    def pop_metrics(self) -> dict[str, float]:
        """Metrics gathered since the last log line (MicroVLMTrainer.log merges them)."""
        metrics, self.pending = self.pending, {}
        return metrics


class QuantisationWarmupCallback(TrainerCallback):
    """BitNet λ warm-up: before optimizer step t, every BitLinear's strength is λ = min(1, t / warmup_steps)
    (1 throughout when `warmup_steps` is 0), and 1 when training ends; logged as `bitnet/strength` when the model
    has BitLinear layers."""

    def __init__(self, warmup_steps: int = 0):
        self.warmup_steps = warmup_steps
        self.strength, self.layers = 1.0, 0

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.strength = min(1.0, state.global_step / self.warmup_steps) if self.warmup_steps else 1.0
        self.layers = set_quantisation_strength(model, self.strength)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        set_quantisation_strength(model, 1.0)

    def pop_metrics(self) -> dict[str, float]:
        return {"bitnet/strength": self.strength} if self.layers else {}


class MemoryCheckpointCallback(TrainerCallback):
    """Saves the written episodic memory (if any) into every checkpoint folder, beside the weights; the memory's
    learned prior is a parameter and is saved with the weights anyway."""

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None or not state.is_world_process_zero or not getattr(model, "memory_written", False):
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            model.save_memory(folder)


class VisualisationCallback(TrainerCallback):
    """Every `every_n_steps` steps, draws `visualisation.figures_for` on a fixed batch: PNGs under
    `<output_dir>/visualisations/`, and to TensorBoard / W&B when `report_to` names them."""

    def __init__(self, batch: dict, every_n_steps: int = 200):
        self.batch, self.every_n_steps = batch, every_n_steps
        self._tensorboard = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every_n_steps or not state.is_world_process_zero:
            return
        import matplotlib.pyplot as plt

        from ..eval.visualisation import figures_for

        folder = Path(args.output_dir) / "visualisations"
        folder.mkdir(parents=True, exist_ok=True)
        was_training = model.training
        model.eval()
        batch = {k: v.to(model.device) for k, v in self.batch.items()}
        try:
            figures = figures_for(model, batch)
        finally:
            model.train(was_training)
        for name, figure in figures.items():
            figure.savefig(folder / f"step{state.global_step:06d}_{name}.png", dpi=90)
            self._report(args, state.global_step, name, figure)
            plt.close(figure)

    def _report(self, args, step: int, name: str, figure) -> None:
        report_to = args.report_to or []
        if "tensorboard" in report_to:
            if self._tensorboard is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(log_dir=args.logging_dir)
            self._tensorboard.add_figure(f"visualisations/{name}", figure, global_step=step)
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({f"visualisations/{name}": wandb.Image(figure)}, step=step)
