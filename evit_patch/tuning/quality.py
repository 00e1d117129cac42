"""How far a patched model's answers move from the unpatched model's, without labels."""

from __future__ import annotations

import torch
from torch import Tensor


def agreement(reference_logits: Tensor, logits: Tensor) -> float:
    """Share of images whose top-1 class is the unpatched model's (``(N, classes)`` each)."""
    return float((logits.argmax(dim=1) == reference_logits.argmax(dim=1)).double().mean())


def mean_kl(reference_logits: Tensor, logits: Tensor) -> float:
    """Mean over images of KL(unpatched || patched) of the softmax outputs, in float64."""
    reference = reference_logits.double().log_softmax(dim=1)
    return float((reference.exp() * (reference - logits.double().log_softmax(dim=1))).sum(dim=1).mean())


def top1(logits: Tensor, labels: Tensor) -> float:
    """Share of images whose top-1 class is the label."""
    return float((logits.argmax(dim=1) == labels).double().mean())


def calibration_split(count: int, calibration: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Disjoint image indices: ``calibration`` of ``range(count)`` drawn at random to choose a
    setting on, and the rest to report it on (a setting chosen on the images it is reported
    on would look better than it is)."""
    if not 0 < calibration < count:
        raise ValueError(f"the calibration split must leave images on both sides: {calibration} of {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[:calibration].sort().values, order[calibration:].sort().values
