"""EmberVLM's reasoning module: iterated reasoning steps on one pooled LM state, a step validator that scores each
step's consistency with the previous one, per-row early stopping, and an answer head (5 robot types).

With h₀ (B, D) the LM's final hidden state at the last prompt token (see `MicroVLMForCausalLM.forward`):

    h_s = h_{s-1} + R(h_{s-1})                      R: D → reasoning_hidden_size → D (GELU, dropout)
    c_s = σ(V([h_s ; h_{s-1}]))                     V: 2D → reasoning_validator_hidden_size → 1 (ReLU, dropout)
    a_s = A(h_s)                                    A: D → reasoning_answer_hidden_size → num_answers (ReLU, dropout)

for s = 1 … `reasoning_max_steps`. Early stopping is per row: a row takes step s only while every earlier step
of it scored below `reasoning_consistency_threshold`; once c_s reaches the threshold the row stops, and its state,
score and answer logits stay those of step s for the remaining steps of the batch (so the outputs keep the shape
(B, max_steps, ...) whatever the batch, and a stopped row never changes). A row takes at least one step and the
loop ends early when every row has stopped. The same rule applies in training and at inference.

Losses (when answer labels are given), over the steps each row took:

    answer      = CE(a_final, y)
    consistency = BCE(c_s, 1[argmax a_s = y])       mean over taken steps

so the validator learns to say "this step already answers right": it is what stops a row, and stopping is
therefore earned by steps whose answer is correct.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ReasoningOutput:
    """Outputs of [`ReasoningHead`]: `steps` (B, S, D) states h_1…h_S, `consistency` (B, S) scores c_s,
    `step_logits` (B, S, A) answer logits a_s, `num_steps` (B,) steps each row took (1…S), `answer_logits` (B, A)
    the logits of each row's last taken step. S = `reasoning_max_steps`; entries after a row's last taken step
    repeat that step."""

    steps: torch.Tensor
    consistency: torch.Tensor
    step_logits: torch.Tensor
    num_steps: torch.LongTensor
    answer_logits: torch.Tensor

    def taken(self) -> torch.Tensor:
        """(B, S) bool: true at the steps each row actually took."""
        positions = torch.arange(self.consistency.shape[1], device=self.num_steps.device)
        return positions.unsqueeze(0) < self.num_steps.unsqueeze(1)


def _mlp(sizes: tuple[int, int, int], activation: nn.Module, dropout: float) -> nn.Sequential:
    width_in, hidden, width_out = sizes
    return nn.Sequential(nn.Linear(width_in, hidden), activation, nn.Dropout(dropout), nn.Linear(hidden, width_out))


class ReasoningHead(nn.Module):
    """The reasoning step R, validator V and answer head A of the module docstring, sized by the config's
    `reasoning_*` fields and the LM hidden size D."""

    def __init__(self, config):
        super().__init__()
        hidden = config.text_config.hidden_size
        dropout = config.reasoning_dropout
        self.max_steps = config.reasoning_max_steps
        self.threshold = config.reasoning_consistency_threshold
        self.step = _mlp((hidden, config.reasoning_hidden_size, hidden), nn.GELU(), dropout)
        self.validator = _mlp((2 * hidden, config.reasoning_validator_hidden_size, 1), nn.ReLU(), dropout)
        self.answer = _mlp(
            (hidden, config.reasoning_answer_hidden_size, config.reasoning_num_answers), nn.ReLU(), dropout
        )

    def forward(self, state: torch.Tensor) -> ReasoningOutput:
        """state h₀ (B, D) → [`ReasoningOutput`], with per-row early stopping (module docstring)."""
        state = state.to(self.step[0].weight.dtype)
        batch = state.shape[0]
        active = torch.ones(batch, dtype=torch.bool, device=state.device)
        num_steps = torch.zeros(batch, dtype=torch.long, device=state.device)
        score = state.new_zeros(batch)
        steps, scores = [], []
        for _ in range(self.max_steps):
            proposed = state + self.step(state)
            proposed_score = torch.sigmoid(self.validator(torch.cat([proposed, state], dim=-1)).squeeze(-1))
            keep = active.unsqueeze(-1)
            state = torch.where(keep, proposed, state)
            score = torch.where(active, proposed_score, score)
            num_steps = num_steps + active.long()
            steps.append(state)
            scores.append(score)
            active = active & (score < self.threshold)
            if not bool(active.any()):
                break
        # Rows that all stopped early: the remaining steps repeat each row's last one.
        steps += [state] * (self.max_steps - len(steps))
        scores += [score] * (self.max_steps - len(scores))
        stacked = torch.stack(steps, dim=1)
        step_logits = self.answer(stacked)
        return ReasoningOutput(
            steps=stacked,
            consistency=torch.stack(scores, dim=1),
            step_logits=step_logits,
            num_steps=num_steps,
            answer_logits=step_logits[:, -1],
        )


def reasoning_losses(output: ReasoningOutput, labels: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer CE, consistency BCE) of the module docstring, for `labels` (B,) in [0, num_answers) or -100
    (rows without an answer are left out of both; with none at all both are 0)."""
    labelled = labels != -100
    if not bool(labelled.any()):
        zero = output.answer_logits.sum() * 0.0
        return zero, zero
    answer = F.cross_entropy(output.answer_logits[labelled].float(), labels[labelled])
    correct = (output.step_logits.argmax(-1) == labels.unsqueeze(1)).float()
    taken = output.taken() & labelled.unsqueeze(1)
    consistency = F.binary_cross_entropy(output.consistency[taken].float(), correct[taken])
    return answer, consistency
