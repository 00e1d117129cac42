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


def min_lr(recipe: Recipe, runtime: Runtime) -> float:
    """The schedule's floor: scaled like the lr, or as given (``optimizer.scale_min_lr: false``)."""
    config = recipe.optimizer
    return scaled_lr(config.min_lr, recipe, runtime) if config.scale_min_lr else config.min_lr


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, runtime: Runtime,
                    steps_per_epoch: int) -> timm.scheduler.CosineLRScheduler:
    """timm's cosine schedule with linear warm-up, counted in updates or in epochs
    (``optimizer.schedule_step``); with ``warmup_prefix`` the cosine spans the rest of the
    run after warm-up instead of the whole run."""
    config = recipe.optimizer
    per_epoch = config.schedule_step == "epoch"
    unit = 1 if per_epoch else steps_per_epoch
    total = max(1, recipe.train.epochs * unit)
    warmup = round(config.warmup_epochs * unit)
    return timm.scheduler.CosineLRScheduler(
        optimizer, t_initial=max(1, total - warmup) if config.warmup_prefix else total,
        lr_min=min_lr(recipe, runtime), warmup_t=warmup, warmup_lr_init=config.warmup_lr,
        warmup_prefix=config.warmup_prefix, t_in_epochs=per_epoch,
    )


def start_epoch_lr(scheduler: timm.scheduler.CosineLRScheduler, recipe: Recipe, epoch: int,
                   global_step: int) -> None:
    """Set the lr a (possibly resumed) epoch trains at. Per update: the value at the next
    update. Per epoch: DeiT's loop (and EViT's, ``main.py``) calls ``step(epoch)`` after
    finishing epoch ``epoch``, so epoch ``e`` trains at the cosine's value at
    ``max(e - 1, 0)``: the first two epochs at the peak."""
    if recipe.optimizer.schedule_step == "epoch":
        scheduler.step(max(epoch - 1, 0))
    else:
        scheduler.step_update(global_step)
