"""DynamicViT's training objective: classification, keep rate, and distillation from the
unpruned teacher (its logits and its final tokens at the tokens the student kept)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evit_patch.dynamicvit.patch import dynamicvit_state
from evit_patch.losses import classification_loss, distillation_loss


def ratio_loss(policies: Sequence[Tensor], targets: Sequence[float]) -> Tensor:
    """Per stage, the batch mean of ``(kept fraction of image tokens - target)^2``;
    averaged over stages."""
    return torch.stack([
        ((policy.mean(dim=1) - target) ** 2).mean() for policy, target in zip(policies, targets, strict=True)
    ]).mean()


def token_distillation_loss(student_tokens: Tensor, teacher_tokens: Tensor, policy: Tensor,
                            num_prefix_tokens: int) -> Tensor:
    """Mean squared error of the student's final image tokens against the teacher's, over
    the tokens the student kept to the end (``policy`` ``(B, N)``, 0/1)."""
    if student_tokens.shape != teacher_tokens.shape:
        raise ValueError(
            f"token distillation needs a teacher with the student's tokens: student {tuple(student_tokens.shape)}, "
            f"teacher {tuple(teacher_tokens.shape)}; use the unpruned student architecture as teacher, or set "
            "token_distill_weight to 0")
    kept = policy.detach() > 0.5
    if not kept.any():
        return student_tokens.sum() * 0.0
    return F.mse_loss(student_tokens[:, num_prefix_tokens:][kept], teacher_tokens[:, num_prefix_tokens:][kept])


class DynamicViTLoss(nn.Module):
    """``CE + ratio_weight * ratio + distill_weight * KL + token_distill_weight * token MSE``.

    Call it after a training-mode forward of the student on the same images: it reads
    the keep decisions and final tokens that forward recorded. The KL term is
    ``F.kl_div`` of the student's log-probabilities against the teacher's, i.e.
    ``KL(teacher || student)``, the usual distillation direction. A student with a
    distillation head (``(cls, dist)`` outputs) learns the labels with the first and
    the teacher with the second.
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], ratio_weight: float = 2.0,
                 distill_weight: float = 0.5, token_distill_weight: float = 0.5, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.state = dynamicvit_state(student)
        self.teacher = teacher
        self.ratio_weight = ratio_weight
        self.distill_weight = distill_weight
        self.token_distill_weight = token_distill_weight
        self.label_smoothing = label_smoothing

    def forward(self, images: Tensor, outputs: Tensor | tuple[Tensor, Tensor], targets: Tensor) -> Tensor:
        logits, distill_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        record = self.state.record
        if len(record.policies) != len(self.state.layers) or record.policies[0].shape[0] != logits.shape[0]:
            raise ValueError("DynamicViTLoss reads the keep decisions of the student's forward on these images; "
                             "run the student in train() mode on the same batch first")
        loss = classification_loss(logits, targets, self.label_smoothing)
        loss = loss + self.ratio_weight * ratio_loss(record.policies, self.state.keep_fractions())
        if self.teacher is None or not (self.distill_weight or self.token_distill_weight):
            return loss
        with torch.no_grad():
            teacher_tokens = self.teacher.forward_features(images)
            teacher_logits = self.teacher.forward_head(teacher_tokens)
        distill = distillation_loss(distill_logits, teacher_logits, "soft")
        loss = loss + self.distill_weight * distill
        if self.token_distill_weight:
            tokens = token_distillation_loss(record.final_tokens, teacher_tokens, record.policies[-1],
                                             self.state.num_prefix_tokens)
            loss = loss + self.token_distill_weight * tokens
        return loss
