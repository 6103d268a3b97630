"""`MicroVLMTrainer`: the HF `Trainer` with MicroVLM's composite loss logged term by term."""

from collections import defaultdict

import torch
from transformers import Trainer

from ..bitnet import quantisation_stats
from .colour_free import ColourFreeConsistency, colour_free_terms


# Output fields of MicroVLMCausalLMOutput that are logged (averaged over the steps between two log lines).
LOGGED_TERMS = (
    "lm_loss",
    "alignment_loss",
    "memory_kl",
    "addressing_kl",
    "memory_step_loss",
    "memory_reconstruction_loss",
    "scope_loss",
    "scope_gate",
    "reasoning_answer_loss",
    "reasoning_consistency_loss",
    "reasoning_num_steps",
    "distillation_loss",
)
# Logged like LOGGED_TERMS when the colour-free consistency term is on (`colour_free.py`).
COLOUR_FREE_TERMS = ("colour_free_loss", "colour_free_kl")


class MicroVLMTrainer(Trainer):
    """loss = LM + α·InfoNCE + β·memory KL + γ·addressing KL (+ memory step loss, memory reconstruction, ScopeNet
    BCE, reasoning answer CE and consistency BCE, distillation KL), weights from the model config; with
    `colour_free`, + weight · (LM loss with colour taken away + KL to it) (`colour_free.py`).

    Each term (and ScopeNet's mean gate) is accumulated at every step and logged as its mean at each logging
    step, beside the Trainer's own `loss`; evaluation logs the same terms with the `eval_` prefix. Predictions
    are the Trainer's own: the loss alone without `compute_metrics`, the logits (B, T, V) with it.
    """

    def __init__(self, *args, colour_free: ColourFreeConsistency | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.colour_free = colour_free
        self._term_sums: dict[str, dict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._term_counts: dict[str, dict[str, int]] = {"train": defaultdict(int), "eval": defaultdict(int)}

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        outputs = model(**inputs)
        split = "train" if model.training else "eval"
        for name in LOGGED_TERMS:
            self._add_term(split, name, getattr(outputs, name, None))
        loss = outputs.loss
        if self._colour_free_now(model, inputs):
            terms = colour_free_terms(model, inputs, outputs.logits, self.colour_free)
            if terms is not None:
                for name, value in zip(COLOUR_FREE_TERMS, terms):
                    self._add_term(split, name, value)
                loss = loss + self.colour_free.weight * sum(terms)
        return (loss, outputs) if return_outputs else loss

    def _colour_free_now(self, model, inputs) -> bool:
        """Whether this step adds the colour-free consistency term: set, training, past its start, a labelled
        batch with images."""
        return (
            self.colour_free is not None
            and model.training
            and self.state.global_step >= self.colour_free.start_step
            and inputs.get("labels") is not None
            and inputs.get("pixel_values") is not None
        )

    def _add_term(self, split: str, name: str, value: torch.Tensor | None) -> None:
        if value is not None:
            self._term_sums[split][name] += float(value.detach().float().mean())
            self._term_counts[split][name] += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        split = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for name, total in self._term_sums[split].items():
            logs[prefix + name] = round(total / self._term_counts[split][name], 6)
        self._term_sums[split].clear()
        self._term_counts[split].clear()
        if split == "train":  # callbacks that gather metrics (e.g. GradientFlowCallback) report through here
            for callback in self.callback_handler.callbacks:
                if hasattr(callback, "pop_metrics"):
                    logs.update(callback.pop_metrics())
            logs.update(quantisation_stats(self.model))
        super().log(logs, *args, **kwargs)
