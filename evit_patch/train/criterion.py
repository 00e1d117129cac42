"""The loss of one fine-tuning step, as the recipe's method asks for it.

Every criterion has the form ``criterion(model, images, targets) -> loss`` so that the
training loop treats them alike: cross-entropy with optional DeiT-style distillation,
DynamicViT's objective, or LV-ViT token labeling (which runs the forward itself to read
the per-token outputs). Label smoothing, mixup's soft targets and the teacher are fitted
to each here.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from timm.data.mixup import mixup_target
from torch import Tensor, nn

from evit_patch.dynamicvit import DynamicViTLoss, unpruned_copy
from evit_patch.losses import classification_loss, distillation_loss
from evit_patch.models.token_labeling import token_labeling_loss
from evit_patch.train.recipe import DataConfig, Recipe, RecipeError, TeacherConfig, TokenLabelingConfig
from evit_patch.train.transformers_source import logits_of

Criterion = Callable[[nn.Module, Tensor, Tensor], Tensor]


class DistillationLoss(nn.Module):
    """Cross-entropy (soft targets with mixup) plus DeiT-style distillation from a teacher:
    ``(1 - alpha) * CE + alpha * distillation``.

    A student with a distillation head returns ``(cls, dist)`` in training: the class
    head learns the labels, the distillation head the teacher.
    """

    def __init__(self, data: DataConfig, teacher: Optional[nn.Module], teacher_config: Optional[TeacherConfig]) -> None:
        super().__init__()
        self.label_smoothing = data.label_smoothing
        self.teacher = teacher
        self.config = teacher_config

    def forward(self, images: Tensor, outputs: Tensor | tuple[Tensor, Tensor], targets: Tensor) -> Tensor:
        logits, distill_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        base = classification_loss(logits, targets, self.label_smoothing)
        if self.teacher is None:
            return base
        with torch.no_grad():
            teacher_logits = logits_of(self.teacher(images))
        distill = distillation_loss(distill_logits, teacher_logits, self.config.kind, self.config.tau)
        return (1 - self.config.alpha) * base + self.config.alpha * distill


class LossOfOutputs:
    """A loss of ``(images, outputs, targets)`` as a step criterion ``(model, images, targets)``."""

    def __init__(self, loss: nn.Module) -> None:
        self.loss = loss

    def __call__(self, model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        return self.loss(images, logits_of(model(images)), targets)


class TokenLabelingCriterion:
    """``criterion(model, images, targets)``: one scalar loss. It runs the forward itself
    (through a DistributedDataParallel wrapper too), so the caller's autocast, gradient
    scaling and clipping apply unchanged."""

    def __init__(self, config: TokenLabelingConfig, data: DataConfig, student: nn.Module, teacher: nn.Module) -> None:
        check_teacher_fits(student, teacher)
        self.config = config
        self.teacher = teacher
        self.num_classes = student.num_classes
        self.label_smoothing = data.label_smoothing

    def __call__(self, model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        if targets.dim() == 1 and self.label_smoothing > 0:  # mixup's soft targets come smoothed already
            targets = mixup_target(targets, self.num_classes, smoothing=self.label_smoothing)
        return token_labeling_loss(model, images, targets, self.teacher, dense_weight=self.config.dense_weight,
                                   cls_weight=self.config.cls_weight)


def check_teacher_fits(student: nn.Module, teacher: nn.Module) -> None:
    """The teacher must predict the student's classes on the student's patch grid, or its
    token labels would not be labels of the student's tokens."""
    if teacher.num_classes != student.num_classes:
        raise RecipeError(f"token_labeling: the teacher predicts {teacher.num_classes} classes, the model "
                          f"{student.num_classes}; give teacher.kwargs the model's num_classes")
    if teacher.patch_embed.grid_size != student.patch_embed.grid_size:
        raise RecipeError(f"token_labeling: the teacher splits images into a {teacher.patch_embed.grid_size} grid "
                          f"of patches, the model into {student.patch_embed.grid_size}; give teacher.kwargs the "
                          "model's img_size and patch_size")


def build_criterion(recipe: Recipe, model: nn.Module, teacher: Optional[nn.Module]) -> Criterion:
    """The step's criterion: token labeling from the LV-ViT teacher; DynamicViT's loss
    (teacher: the recipe's, else the unpruned starting model); or cross-entropy with
    optional DeiT-style distillation."""
    if recipe.token_labeling.enabled:
        return TokenLabelingCriterion(recipe.token_labeling, recipe.data, model, teacher)
    if not recipe.dynamicvit.enabled:
        return LossOfOutputs(DistillationLoss(recipe.data, teacher, recipe.teacher))
    config = recipe.dynamicvit
    return LossOfOutputs(DynamicViTLoss(model, teacher if teacher is not None else unpruned_copy(model),
                                        config.ratio_weight, config.distill_weight, config.token_distill_weight,
                                        recipe.data.label_smoothing))
