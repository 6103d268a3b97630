"""`MicroVLMTrainer`: the HF `Trainer` with MicroVLM's composite loss logged term by term."""

from collections import defaultdict

from transformers import Trainer

from ..bitnet import quantisation_stats


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


class MicroVLMTrainer(Trainer):
    """loss = LM + α·InfoNCE + β·memory KL + γ·addressing KL (+ memory step loss, memory reconstruction, ScopeNet
    BCE, reasoning answer CE and consistency BCE, distillation KL), weights from the model config.

    Each term (and ScopeNet's mean gate) is accumulated at every step and logged as its mean at each logging
    step, beside the Trainer's own `loss`; evaluation logs the same terms with the `eval_` prefix. Predictions
    are the Trainer's own: the loss alone without `compute_metrics`, the logits (B, T, V) with it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._term_sums: dict[str, dict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._term_counts: dict[str, dict[str, int]] = {"train": defaultdict(int), "eval": defaultdict(int)}

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        outputs = model(**inputs)
        split = "train" if model.training else "eval"
        for name in LOGGED_TERMS:
            value = getattr(outputs, name, None)
            if value is not None:
                self._term_sums[split][name] += float(value.detach().float().mean())
                self._term_counts[split][name] += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

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
