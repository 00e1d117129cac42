"""Optimizer and learning-rate schedule of a fine-tuning run, from timm."""

from __future__ import annotations

import timm.optim
import timm.scheduler
import torch
from torch import nn

from evit_patch.dynamicvit import dynamicvit_param_groups
from evit_patch.train.distributed import Runtime
from evit_patch.train.recipe import Recipe


def scaled_lr(lr: float, recipe: Recipe, runtime: Runtime) -> float:
    """Linear scaling: recipe rates are per 512 images of (global) batch."""
    return lr * recipe.train.batch_size * runtime.world_size / 512


def build_optimizer(model: nn.Module, recipe: Recipe, runtime: Runtime) -> torch.optim.Optimizer:
    """timm's optimizer; with DynamicViT, the backbone's groups at ``backbone_lr_scale`` of the rate."""
    optimizer = recipe.optimizer
    parameters = dynamicvit_param_groups(model, optimizer.weight_decay, recipe.dynamicvit.backbone_lr_scale) \
        if recipe.dynamicvit.enabled else model
    return timm.optim.create_optimizer_v2(parameters, opt=optimizer.name, lr=scaled_lr(optimizer.lr, recipe, runtime),
                                          weight_decay=optimizer.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, runtime: Runtime,
                    steps_per_epoch: int) -> timm.scheduler.CosineLRScheduler:
    """timm's cosine schedule stepped per update, with linear warm-up."""
    config = recipe.optimizer
    return timm.scheduler.CosineLRScheduler(
        optimizer, t_initial=max(1, recipe.train.epochs * steps_per_epoch),
        lr_min=scaled_lr(config.min_lr, recipe, runtime), warmup_t=round(config.warmup_epochs * steps_per_epoch),
        warmup_lr_init=config.warmup_lr, t_in_epochs=False,
    )
