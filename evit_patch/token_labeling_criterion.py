"""Token labeling as the loss of a fine-tuning step.

The recipe's teacher, an unpatched LV-ViT, labels every patch of the very images the
student sees (mixed ones included), and :func:`evit_patch.token_labeling.token_labeling_loss`
scores the tokens EViT kept against those labels. This module only fits a recipe to that
loss: its weights, label smoothing of hard targets, and a teacher that labels the
student's patches in the student's classes.
"""

from __future__ import annotations

from timm.data.mixup import mixup_target
from torch import Tensor, nn

from evit_patch.config import DataConfig, RecipeError, TokenLabelingConfig
from evit_patch.token_labeling import token_labeling_loss


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
