"""Knowledge distillation from a teacher's next-token logits (EmberVLM's stage 2 option)."""

import torch
import torch.nn.functional as F


def distillation_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.LongTensor, temperature: float
) -> torch.Tensor:
    """τ² · mean over predicted positions of KL(softmax(teacher/τ) ‖ softmax(student/τ)).

    logits, teacher_logits: (B, T, V) next-token scores at the same positions (position t predicts token t+1);
    labels: (B, T) as given to the LM loss (-100: not a target). Only the positions the LM loss scores count: t
    with labels[t+1] != -100. The τ² factor keeps the gradient scale independent of τ (Hinton et al., 2015).
    This is the forward KL of the usual recipe: the student covers every token the teacher deems likely.
    """
    if teacher_logits.shape != logits.shape:
        raise ValueError(
            f"teacher_logits must have the student's logits shape {tuple(logits.shape)} (batch, seq, vocab), got "
            f"{tuple(teacher_logits.shape)}: compute them on the same input_ids with a teacher of the same vocabulary"
        )
    predicted = torch.zeros_like(labels, dtype=torch.bool)
    predicted[:, :-1] = labels[:, 1:] != -100
    if not bool(predicted.any()):
        return logits.sum() * 0.0
    student = F.log_softmax(logits[predicted].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[predicted].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return temperature**2 * kl
