"""What a recipe will do, worked out without training or loading data: the effective
learning rates and batch at a number of processes, the steps an epoch takes, the data
pipeline, and the model's cost and token counts with its method in place.

Everything is computed by the code a run uses (the optimizer's scaling, timm's scheduler
stepped as the loop steps it, the loader's sampler over a stand-in of the training set's
size, timm's transforms, ``count_macs``); the model is built with random weights unless
the recipe names local files that exist (costs and token counts do not depend on weights).
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import timm.data
import torch
from timm.layers import DropPath
from torch import nn

from evit_patch.core.eval_mode import eval_mode
from evit_patch.core.model_info import example_images, prefix_token_count, transformer_blocks
from evit_patch.cost import count_macs
from evit_patch.train.data import image_transform_args
from evit_patch.train.distributed import Runtime
from evit_patch.train.loaders import train_sampler
from evit_patch.train.methods import recipe_method
from evit_patch.train.model_source import build_model
from evit_patch.train.optim import build_scheduler, min_lr, scaled_lr, start_epoch_lr
from evit_patch.train.recipe import DataConfig, ModelConfig, Recipe, reduces_tokens

IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1k (ILSVRC 2012) training images
FASHION_MNIST_TRAIN_IMAGES = 60_000


def describe(recipe: Recipe, world_size: int) -> tuple[dict[str, Any], list[str]]:
    """The values a run of ``recipe`` on ``world_size`` processes implies, and notes on
    what the dry run could not see (missing data, weights not loaded)."""
    notes: list[str] = []
    runtime = Runtime(torch.device("cpu"), 0, world_size)
    images = _train_images(recipe.data, notes)
    sampler = train_sampler(range(images), recipe, 0, world_size, 0, torch.Generator())
    steps = len(sampler) // recipe.train.batch_size
    if recipe.train.max_steps_per_epoch:
        steps = min(steps, recipe.train.max_steps_per_epoch)
    implied: dict[str, Any] = {
        "world_size": world_size,
        "global_batch": recipe.train.batch_size * world_size,
        "peak_lr": scaled_lr(recipe.optimizer.lr, recipe, runtime),
        "min_lr": min_lr(recipe, runtime),
        "warmup_lr": recipe.optimizer.warmup_lr,
        "train_images": images,
        "steps_per_epoch": steps,
        "updates": steps * recipe.train.epochs,
        "lr_at_epoch_starts": _lr_at_epoch_starts(recipe, runtime, max(steps, 1)),
    }
    dry = _dry_recipe(recipe, notes)
    model = build_model(dry.model).eval()
    implied["data_pipeline"] = {**_pipeline(recipe.data, model), "sampler": type(sampler).__name__}
    implied.update(_model_facts(dry, model))
    return implied, notes


def _train_images(data: DataConfig, notes: list[str]) -> int:
    """The size of the training split: counted in the folder (file names only), or the
    known size of ImageNet-1k / Fashion-MNIST when the folder is not there."""
    if data.dataset == "imagefolder":
        folder = Path(data.root or "") / data.train_split
        if folder.is_dir():
            total = len(timm.data.create_dataset("", root=str(folder)))
        else:
            total = IMAGENET_TRAIN_IMAGES
            notes.append(f"no folder {str(folder)!r}: steps per epoch assume ImageNet-1k's "
                         f"{IMAGENET_TRAIN_IMAGES:,} training images")
    else:
        total = FASHION_MNIST_TRAIN_IMAGES
    return min(total, data.train_subset) if data.train_subset else total


def _lr_at_epoch_starts(recipe: Recipe, runtime: Runtime, steps_per_epoch: int) -> list[float]:
    """The lr of the first update of every epoch, from timm's scheduler on a stand-in
    optimizer, set exactly as the training loop sets it."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=scaled_lr(recipe.optimizer.lr, recipe, runtime))
    scheduler = build_scheduler(optimizer, recipe, runtime, steps_per_epoch)
    values = []
    for epoch in range(recipe.train.epochs):
        start_epoch_lr(scheduler, recipe, epoch, epoch * steps_per_epoch)
        values.append(float(f"{optimizer.param_groups[0]['lr']:.6g}"))
    return values


def _pipeline(data: DataConfig, model: nn.Module) -> dict[str, Any]:
    """The training and evaluation transforms an image-folder run builds, summarized."""
    if data.dataset != "imagefolder":
        return {"dataset": data.dataset, "transform": "normalized tensors, no augmentation"}
    train = timm.data.create_transform(**image_transform_args(data, model, training=True))
    evaluation = timm.data.create_transform(**image_transform_args(data, model, training=False))
    erasing = next((t for t in train.transforms if isinstance(t, timm.data.random_erasing.RandomErasing)), None)
    resize, crop = evaluation.transforms[0], evaluation.transforms[1]
    return {
        "train": [type(t).__name__ for t in train.transforms],
        "train_interpolation": image_transform_args(data, model, training=True)["interpolation"],
        "random_erasing": None if erasing is None else {"probability": erasing.probability, "mode": erasing.mode},
        "eval_resize": getattr(resize, "size", None),
        "eval_crop": list(getattr(crop, "size", ())),
        "eval_crop_pct": image_transform_args(data, model, training=False)["crop_pct"],
    }


def _weightless(config: Optional[ModelConfig]) -> tuple[Optional[ModelConfig], bool]:
    """``config`` without hub weights (never downloaded here) and without absent files,
    and whether any weights were left out."""
    if config is None:
        return None, False
    config = copy.deepcopy(config)
    dropped = config.pretrained
    config.pretrained = False
    for key in ("pretrained_file", "checkpoint"):
        path = getattr(config, key)
        if path and not Path(path).is_file():
            setattr(config, key, None)
            dropped = True
    return config, dropped


def _dry_recipe(recipe: Recipe, notes: list[str]) -> Recipe:
    """The recipe with its model and oracle built from local files only."""
    dry = copy.deepcopy(recipe)
    dry.model, dropped = _weightless(recipe.model)
    dry.oracle, oracle_dropped = _weightless(recipe.oracle)
    if dropped or oracle_dropped:
        notes.append("hub weights are not downloaded and absent files not read: the model is built with random "
                     "weights (costs and token counts do not depend on them)")
    return dry


def _model_facts(dry: Recipe, model: nn.Module) -> dict[str, Any]:
    """GMACs without and with the method (at its target keep rate), image tokens after
    each reorganization layer, and the modules that act differently in train mode."""
    unpatched = count_macs(model)
    patched = recipe_method(dry).apply(model, dry, None, model).eval()
    layers = dry.dynamicvit.layers if dry.dynamicvit.enabled else dry.reduction.layers if reduces_tokens(dry) else []
    return {
        "gmacs_unpatched": round(unpatched / 1e9, 3),
        "gmacs_patched": round(count_macs(patched) / 1e9, 3),
        "image_tokens": _image_tokens(patched, layers),
        "active_in_train_mode": _train_mode_modules(patched),
    }


def _image_tokens(model: nn.Module, layers: list[int]) -> dict[str, Any]:
    """Image tokens entering the blocks and leaving each reorganization layer, measured
    on one forward in eval mode."""
    blocks = transformer_blocks(model)
    prefix = prefix_token_count(model)
    lengths: dict[str, int] = {}

    def record(name: str, tokens: torch.Tensor) -> None:
        lengths.setdefault(name, tokens.shape[1] - prefix)

    hooks = [blocks[index].register_forward_hook(
        lambda module, args, output, index=index: record(str(index), output)) for index in layers]
    hooks.append(blocks[0].register_forward_pre_hook(lambda module, args: record("input", args[0])))
    try:
        with torch.no_grad(), eval_mode(model):
            model(example_images(model, 1, seed=0))
    finally:
        for hook in hooks:
            hook.remove()
    return {"input": lengths["input"], "after_layer": {index: lengths[str(index)] for index in layers}}


def _train_mode_modules(model: nn.Module) -> str:
    """Modules whose forward differs between train and eval mode: dropout and drop-path
    with a non-zero rate, batch norm; "none" when train mode computes what eval mode does."""
    kinds: Counter[str] = Counter()
    for module in model.modules():
        rate = module.p if isinstance(module, nn.Dropout) else module.drop_prob if isinstance(module, DropPath) else None
        if (rate is not None and rate > 0) or isinstance(module, nn.modules.batchnorm._BatchNorm):
            kinds[type(module).__name__] += 1
    return ", ".join(f"{name} x{count}" for name, count in sorted(kinds.items())) or "none"
