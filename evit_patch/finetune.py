"""Fine-tune a timm ViT with EViT from a YAML recipe, on CPU, one GPU or many (torchrun).

    python -m evit_patch.finetune recipes/fashion_mnist.yaml [--set train.epochs=2] [--resume PATH]
    torchrun --nproc_per_node 8 -m evit_patch.finetune recipes/deit_s.yaml

Each epoch writes ``checkpoint.pth`` atomically (model, optimizer, scheduler, scaler,
EMA, position and RNG state) and a line of ``metrics.jsonl``; ``--resume`` continues to
the same weights as an uninterrupted run. Ctrl-C saves and exits; a non-finite loss
stops before the update, the last good checkpoint intact. The final weights go to
``model.safetensors`` with the resolved ``recipe.yaml`` beside them, from which
``python -m evit_patch.evaluate`` rebuilds the patched model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import yaml
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from evit_patch import distributed
from evit_patch.checkpoint import CheckpointError, load_checkpoint, save_atomic, save_weights
from evit_patch.config import PrunedShapeConfig, Recipe, RecipeError, load_recipe, recipe_to_dict
from evit_patch.data import build_dataset
from evit_patch.dynamicvit import DynamicViTLoss, apply_dynamicvit, set_backbone_frozen, unpruned_copy
from evit_patch.errors import UnsupportedModelError
from evit_patch.evaluation import accuracy, autocast
from evit_patch.macs import count_macs
from evit_patch.methods import apply_recipe_reducer, method_label
from evit_patch.patch import apply_evit, set_keep_rate
from evit_patch.schedule import keep_rate_at
from evit_patch.structural import apply_pruned_shape, prune_to_macs, pruned_shape
from evit_patch.token_labeling_criterion import TokenLabelingCriterion
from evit_patch.training import (
    DistillationLoss, build_mixup, build_model, build_optimizer, build_scheduler, eval_loader, rng_state,
    seed_everything, set_rng_state, train_loader,
)


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite."""


@dataclass
class Position:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


class _Interrupt:
    """Turns Ctrl-C into a request honoured at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_Interrupt":
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def prepare_model(recipe: Recipe) -> nn.Module:
    """The recipe's model with its token reducer (EViT by default) at the schedule's
    starting keep rate, DynamicViT, or width-pruned to the structural budget instead."""
    model = build_model(recipe.model)
    if recipe.structural.enabled:
        _prune_width(model, recipe)
    elif recipe.dynamicvit.enabled:
        apply_dynamicvit(model, recipe.dynamicvit.layers, recipe.dynamicvit.keep_ratio)
    elif recipe.evit.enabled:
        start = keep_rate_at(0.0, recipe.evit.keep_rate, recipe.keep_rate_schedule)
        apply_recipe_reducer(model, recipe, start, starting_model=model)
    return model


def _prune_width(model: nn.Module, recipe: Recipe) -> None:
    """Prune heads and MLP channels to ``structural.shape``, else to ``target_macs``, else
    to the cost of EViT at ``evit.layers``/``evit.keep_rate``; the widths are recorded in
    ``structural.shape``, so the run's recipe.yaml rebuilds this architecture."""
    structural = recipe.structural
    try:
        if structural.shape is not None:
            apply_pruned_shape(model, dataclasses.asdict(structural.shape), importance=structural.importance)
        else:
            target = structural.target_macs
            if target is None:
                evit = recipe.evit
                target = count_macs(apply_evit(copy.deepcopy(model), evit.layers, evit.keep_rate, fuse=evit.fuse))
            prune_to_macs(model, target, importance=structural.importance)
    except ValueError as error:
        raise RecipeError(f"structural: {error}") from error
    structural.shape = PrunedShapeConfig(**pruned_shape(model))


class _LossOfOutputs:
    """A loss of ``(images, outputs, targets)`` as a step criterion ``(model, images, targets)``,
    the form of losses that run the forward themselves (token labeling)."""

    def __init__(self, loss: nn.Module) -> None:
        self.loss = loss

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(images, model(images), targets)


def build_criterion(recipe: Recipe, model: nn.Module, teacher: Optional[nn.Module]) -> Callable:
    """The step's ``criterion(model, images, targets)``: token labeling from the LV-ViT
    teacher; DynamicViT's loss (teacher: the recipe's, else the unpruned starting model);
    or cross-entropy with optional DeiT-style distillation."""
    if recipe.token_labeling.enabled:
        return TokenLabelingCriterion(recipe.token_labeling, recipe.data, model, teacher)
    if not recipe.dynamicvit.enabled:
        return _LossOfOutputs(DistillationLoss(recipe.data, teacher, recipe.teacher))
    config = recipe.dynamicvit
    return _LossOfOutputs(DynamicViTLoss(model, teacher if teacher is not None else unpruned_copy(model),
                                         config.ratio_weight, config.distill_weight, config.token_distill_weight,
                                         recipe.data.label_smoothing))


def _checkpoint_state(model, optimizer, scheduler, scaler, ema, position: Position, recipe: Recipe,
                      rng: list[dict]) -> dict:
    return {
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "position": vars(position).copy(),
        "rng": rng,  # one entry per rank: each process draws its own augmentation
        "recipe": recipe_to_dict(recipe),
    }


def train(recipe: Recipe, resume: Optional[str] = None, show_progress: bool = True) -> Path:
    """Run the recipe; returns the output folder."""
    runtime = distributed.start()
    try:
        return run_training(recipe, resume, runtime, show_progress)[0]
    finally:
        distributed.stop(runtime)


def run_training(recipe: Recipe, resume: Optional[str], runtime: distributed.Runtime,
                 show_progress: bool = True) -> tuple[Path, nn.Module]:
    """The training loop in an already started runtime: the output folder and the model."""
    output = Path(recipe.train.output_dir)
    if recipe.train.amp == "fp16" and runtime.device.type != "cuda":
        raise RecipeError("train.amp: fp16 needs a CUDA GPU; use bf16 (or none) on a CPU")
    seed_everything(recipe.train.seed + runtime.rank)
    model = prepare_model(recipe).to(runtime.device)
    train_set = build_dataset(recipe.data, model, training=True)
    evaluation = eval_loader(build_dataset(recipe.data, model, training=False), recipe, runtime)
    steps_per_epoch = len(train_loader(train_set, recipe, runtime, 0))
    if recipe.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, recipe.train.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise RecipeError(f"train.batch_size {recipe.train.batch_size} is larger than the training set")

    optimizer = build_optimizer(model, recipe, runtime)
    scheduler = build_scheduler(optimizer, recipe, runtime, steps_per_epoch)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=recipe.train.amp == "fp16")
    ema = ModelEmaV3(model, decay=recipe.train.ema_decay) if recipe.train.ema_decay else None
    teacher = build_model(recipe.teacher).to(runtime.device).eval() if recipe.teacher else None
    criterion = build_criterion(recipe, model, teacher)
    mixup = build_mixup(recipe.data, _unwrap(model).num_classes)
    if getattr(model, "set_distilled_training", None) and teacher is not None:
        model.set_distilled_training(True)
    position = Position()
    if resume:
        state = load_checkpoint(resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        position = Position(**state["position"])
        set_rng_state(_own_rng(state["rng"], runtime))
    scheduler.step_update(position.global_step)  # per-group lr_scale from the first step on
    if runtime.distributed:  # DynamicViT freezes the backbone for some epochs: frozen parameters go unused
        model = DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                                        find_unused_parameters=recipe.dynamicvit.enabled)

    if runtime.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    checkpoint_path = output / "checkpoint.pth"

    def save() -> None:
        rng = distributed.gather(rng_state(), runtime)
        if runtime.is_main:
            save_atomic(_checkpoint_state(model, optimizer, scheduler, scaler, ema, position, recipe, rng),
                        checkpoint_path)
        distributed.barrier(runtime)

    with _Interrupt() as interrupt:
        while position.epoch < recipe.train.epochs:
            loader = train_loader(train_set, recipe, runtime, position.epoch, skip_batches=position.step_in_epoch)
            model.train()
            if recipe.dynamicvit.enabled:
                set_backbone_frozen(_unwrap(model), position.epoch < recipe.dynamicvit.freeze_epochs)
            progress = tqdm(total=steps_per_epoch, initial=position.step_in_epoch, disable=not (show_progress and runtime.is_main),
                            desc=f"epoch {position.epoch + 1}/{recipe.train.epochs}", dynamic_ncols=True)
            losses, seen, started = [], 0, time.perf_counter()
            for index, (images, targets) in enumerate(loader, start=position.step_in_epoch):
                if index >= steps_per_epoch:
                    break
                images, targets = images.to(runtime.device), targets.to(runtime.device)
                keep_rate = keep_rate_at(position.epoch + index / steps_per_epoch, recipe.evit.keep_rate,
                                         recipe.keep_rate_schedule)
                if recipe.evit.enabled:
                    set_keep_rate(_unwrap(model), keep_rate)
                    if ema is not None:
                        set_keep_rate(ema.module, keep_rate)
                if mixup is not None:
                    images, targets = mixup(images, targets)
                with autocast(runtime.device, recipe.train.amp):
                    loss = criterion(model, images, targets)
                diverged, interrupted = distributed.any_across(
                    [not math.isfinite(loss.item()), interrupt.requested], runtime)
                if diverged:
                    value = loss.item() if not math.isfinite(loss.item()) else "not finite on another process"
                    raise TrainingDiverged(
                        f"loss is {value} at epoch {position.epoch + 1}, step {index + 1}; nothing of this step was "
                        f"applied and the last good checkpoint is {checkpoint_path}. Lower optimizer.lr, set "
                        "optimizer.clip_grad, or use train.amp: none"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if recipe.optimizer.clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), recipe.optimizer.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                position.global_step += 1
                position.step_in_epoch = index + 1
                scheduler.step_update(position.global_step)
                if ema is not None:
                    ema.update(model, step=position.global_step)
                losses.append(loss.item())
                seen += images.shape[0]
                progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                     keep=f"{keep_rate:.3f}" if recipe.evit.enabled else "-",
                                     img_s=f"{seen / (time.perf_counter() - started):.0f}")
                progress.update(1)
                if interrupted:
                    save()
                    progress.close()
                    print(f"interrupted: saved {checkpoint_path}; continue with --resume {checkpoint_path}")
                    sys.exit(130)
            progress.close()
            metrics = {"epoch": position.epoch + 1, "train_loss": sum(losses) / max(len(losses), 1),
                       "lr": optimizer.param_groups[0]["lr"], "keep_rate": keep_rate_at(
                           position.epoch + 1, recipe.evit.keep_rate, recipe.keep_rate_schedule)
                       if recipe.evit.enabled else None,
                       "train_images_per_second": seen / (time.perf_counter() - started),
                       **accuracy(model, evaluation, runtime, recipe.train.amp)}
            if ema is not None:
                metrics.update({f"ema_{k}": v for k, v in accuracy(ema.module, evaluation, runtime, recipe.train.amp).items()})
            position.epoch, position.step_in_epoch = position.epoch + 1, 0
            save()
            if runtime.is_main:
                with open(output / "metrics.jsonl", "a") as handle:
                    handle.write(json.dumps(metrics) + "\n")
                print(json.dumps(metrics))
    if runtime.is_main:
        save_weights(_unwrap(model), output / "model.safetensors")
        if ema is not None:
            save_weights(ema.module, output / "model_ema.safetensors")
    distributed.barrier(runtime)
    return output, _unwrap(model)


def _own_rng(states: dict | list[dict], runtime: distributed.Runtime) -> dict:
    """This rank's saved RNG state; a resume on another number of processes keeps going
    (from rank 0's state) but can no longer repeat the uninterrupted run exactly."""
    states = states if isinstance(states, list) else [states]
    if len(states) != runtime.world_size and runtime.is_main:
        print(f"warning: checkpoint written by {len(states)} process(es), resumed on {runtime.world_size}: "
              "data order and augmentation differ from an uninterrupted run", file=sys.stderr)
    return states[runtime.rank] if len(states) == runtime.world_size else states[0]


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                        help="override a recipe value; repeatable")
    parser.add_argument("--resume", default=None, help="checkpoint.pth to continue from")
    parser.add_argument("--no-report", action="store_true", help="skip the base-vs-EViT table at the end")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as error:
        parser.exit(2, f"error: {error}\n")
    try:
        output = train(recipe, args.resume)
    except (RecipeError, CheckpointError, TrainingDiverged, UnsupportedModelError, FileNotFoundError) as error:
        parser.exit(1, f"error: {error}\n")
    if not args.no_report and method_label(recipe) is not None and int(os.environ.get("RANK", "0")) == 0:
        from evit_patch.evaluate import compare_with_base

        print(compare_with_base(recipe, output / "model.safetensors"))


if __name__ == "__main__":
    main()
