"""The classification and distillation losses every method trains with.

Plain cross-entropy against class indices or soft targets (mixup), and DeiT's
distillation term, soft (temperature-scaled KL) or hard (the teacher's argmax as label).
DynamicViT's and token labeling's own terms build on these in their packages.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor


def classification_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy against class indices ``(B,)`` (with label smoothing), or against soft
    targets ``(B, classes)`` such as mixup's, which carry their own smoothing."""
    if targets.ndim == logits.ndim:
        return SoftTargetCrossEntropy()(logits, targets)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, kind: Literal["soft", "hard"],
                      tau: float = 1.0) -> Tensor:
    """DeiT's distillation term: ``tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))``
    averaged over the batch (soft), or cross-entropy against the teacher's argmax (hard)."""
    if kind == "hard":
        return F.cross_entropy(student_logits, teacher_logits.argmax(-1))
    return F.kl_div(F.log_softmax(student_logits / tau, -1), F.log_softmax(teacher_logits / tau, -1),
                    reduction="batchmean", log_target=True) * tau * tau
