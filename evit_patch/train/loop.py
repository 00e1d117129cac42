"""The fine-tuning loop: start or resume a run, train epoch by epoch, evaluate, checkpoint.

Each epoch writes a line of ``metrics.jsonl`` and ``checkpoint.pth`` atomically (model,
optimizer, scheduler, scaler, EMA, position, the epoch's progress and RNG state);
resuming continues to the same weights as an uninterrupted run, and a resumed epoch's
metrics cover all its steps. What a resume may change in the recipe is in
:mod:`evit_patch.train.resume`; a folder holding a run is never written over silently
(:mod:`evit_patch.train.run_folder`). Ctrl-C saves and exits; a non-finite loss stops
before the update, naming the last good checkpoint of this run if there is one. The
final weights go to ``model.safetensors`` with the resolved ``recipe.yaml`` beside them.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml
from timm.utils import ModelEmaV3, unwrap_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from evit_patch.core.token_patch import set_keep_rate
from evit_patch.dynamicvit import set_backbone_frozen
from evit_patch.errors import CheckpointError
from evit_patch.train import distributed
from evit_patch.train.assembly import prepare_model
from evit_patch.train.checkpoint import load_state_exactly, load_training_checkpoint, save_atomic, save_weights
from evit_patch.train.criterion import build_criterion
from evit_patch.train.data import build_dataset
from evit_patch.train.loaders import build_mixup, eval_loader, train_loader
from evit_patch.train.metrics import accuracy, autocast
from evit_patch.train.model_source import build_model
from evit_patch.train.optim import build_optimizer, build_scheduler, start_epoch_lr
from evit_patch.train.recipe import Recipe, RecipeError, recipe_to_dict, reduces_tokens
from evit_patch.train.reproducibility import rng_state, seed_everything, set_rng_state
from evit_patch.train.resume import check_resume
from evit_patch.train.run_folder import check_output_folder, claimed_output_folder, prepare_output_folder
from evit_patch.train.run_state import (
    EpochProgress,
    Interrupt,
    Position,
    Run,
    TrainingDiverged,
    run_summary,
    update_hook,
    update_hooks,
)
from evit_patch.train.transformers_source import class_count


def train(recipe: Recipe, resume: Optional[str] = None, show_progress: bool = True, overwrite: bool = False) -> Path:
    """Run the recipe; returns the output folder."""
    runtime = distributed.start()
    try:
        return run_training(recipe, resume, runtime, show_progress, overwrite)[0]
    finally:
        distributed.stop(runtime)


def run_training(recipe: Recipe, resume: Optional[str], runtime: distributed.Runtime,
                 show_progress: bool = True, overwrite: bool = False) -> tuple[Path, nn.Module]:
    """The training loop in an already started runtime: the output folder and the model.

    The output folder is claimed for the run's life (a second run into it stops), then it,
    the checkpoint to resume and the recipe's changes against it are checked, all before
    any data or model is built; ``overwrite`` lets a fresh run replace the run in
    ``train.output_dir`` (its files are deleted once the new run has started)."""
    output = Path(recipe.train.output_dir)
    with claimed_output_folder(output, runtime):
        return _train_in_claimed_folder(recipe, output, resume, runtime, show_progress, overwrite)


def _train_in_claimed_folder(recipe: Recipe, output: Path, resume: Optional[str], runtime: distributed.Runtime,
                             show_progress: bool, overwrite: bool) -> tuple[Path, nn.Module]:
    source = Path(resume) if resume else None
    state = load_training_checkpoint(source) if source is not None else None
    check_output_folder(output, source, overwrite)
    if state is not None:
        for warning in check_resume(state, recipe, source):
            if runtime.is_main:
                print(f"warning: {warning}", file=sys.stderr)
    if runtime.is_main:
        print(run_summary(recipe, output, resuming=state is not None), flush=True)
    run = start_run(recipe, runtime)
    if state is not None:
        resume_run(run, state, source)
    if runtime.distributed:  # DynamicViT freezes the backbone for some epochs: frozen parameters go unused
        run.model = DistributedDataParallel(
            run.model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            find_unused_parameters=recipe.dynamicvit.enabled)
    if runtime.is_main:
        prepare_output_folder(output, overwrite, run.position.epoch if state is not None else None)
        (output / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    with Interrupt() as interrupt:
        while run.position.epoch < recipe.train.epochs:
            progress = train_one_epoch(run, interrupt, show_progress)
            metrics = epoch_metrics(run, progress)
            run.position.epoch, run.position.step_in_epoch = run.position.epoch + 1, 0
            run.progress = EpochProgress()
            if runtime.is_main:  # before the checkpoint: a resume from the one before drops this line again
                with open(output / "metrics.jsonl", "a") as handle:
                    handle.write(json.dumps(metrics) + "\n")
            save_checkpoint(run)
            if runtime.is_main:
                print(json.dumps(metrics))
    _write_on_main(runtime, lambda: _save_final_weights(run, output),
                   f"the trained weights are safe in {run.checkpoint_path} (model.checkpoint can start from it)")
    return output, unwrap_model(run.model)


def _save_final_weights(run: Run, output: Path) -> None:
    save_weights(unwrap_model(run.model), output / "model.safetensors")
    if run.ema is not None:
        save_weights(run.ema.module, output / "model_ema.safetensors")


def _write_on_main(runtime: distributed.Runtime, write: Callable[[], None], advice: str) -> None:
    """``write`` on rank 0, every rank waiting; a write that fails there (a full disk) stops
    every rank with its one line and ``advice``."""
    failure = None
    if runtime.is_main:
        try:
            write()
        except CheckpointError as error:
            failure = f"{error}; {advice}"
    failure = distributed.gather(failure, runtime)[0]
    if failure is not None:
        raise CheckpointError(failure)


def start_run(recipe: Recipe, runtime: distributed.Runtime) -> Run:
    """The recipe's model with its method, data, optimizer, schedule and loss, at step 0."""
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
    teacher = build_model(recipe.teacher).to(runtime.device).eval() if recipe.teacher else None
    if getattr(model, "set_distilled_training", None) and teacher is not None:
        model.set_distilled_training(True)
    return Run(
        recipe, runtime, model, optimizer,
        scheduler=build_scheduler(optimizer, recipe, runtime, steps_per_epoch),
        scaler=torch.amp.GradScaler(runtime.device.type, enabled=recipe.train.amp == "fp16"),
        ema=ModelEmaV3(model, decay=recipe.train.ema_decay) if recipe.train.ema_decay else None,
        criterion=build_criterion(recipe, model, teacher),
        mixup=build_mixup(recipe.data, class_count(model)),
        train_set=train_set, evaluation=evaluation, steps_per_epoch=steps_per_epoch,
    )


def resume_run(run: Run, state: dict[str, Any], source: Path) -> None:
    """Model, optimizer, scaler, EMA, position, epoch progress and this rank's RNG from a
    training checkpoint (see :func:`load_training_checkpoint`). The lr schedule and every
    optimizer setting come from the recipe, which may have changed them
    (:mod:`evit_patch.train.resume`): the schedule is not loaded but rebuilt, and the
    optimizer's settings are the recipe's again after its state is loaded."""
    where = f"--resume {str(source)!r}"
    load_state_exactly(run.model, state["model"], where, f"this recipe's model ({run.recipe.model.name})")
    settings = [{key: value for key, value in group.items() if key != "params"} for group in run.optimizer.param_groups]
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{where}: its optimizer state does not fit this recipe's optimizer "
                              f"({' '.join(str(error).split())})") from None
    for group, values in zip(run.optimizer.param_groups, settings):
        group.update(values)
    saved_amp = (state.get("recipe") or {}).get("train", {}).get("amp", run.recipe.train.amp)
    if saved_amp == run.recipe.train.amp:
        run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None and state.get("ema") is not None:
        run.ema.load_state_dict(state["ema"])
    try:
        run.position = Position(**state["position"])
        run.progress = EpochProgress(**state.get("epoch_progress", {}))
    except TypeError as error:
        raise CheckpointError(f"{where}: its position is not one this version reads ({error})") from None
    if run.position.step_in_epoch > run.steps_per_epoch:
        raise CheckpointError(
            f"{where} stopped after step {run.position.step_in_epoch} of epoch {run.position.epoch + 1}, but this "
            f"recipe's epochs have {run.steps_per_epoch} steps; has the training data changed?")
    run.last_checkpoint = source
    set_rng_state(_own_rng(state["rng"], run.runtime))


def _own_rng(states: dict | list[dict], runtime: distributed.Runtime) -> dict:
    """This rank's saved RNG state; a resume on another number of processes keeps going
    (from rank 0's state) but can no longer repeat the uninterrupted run exactly."""
    states = states if isinstance(states, list) else [states]
    if len(states) != runtime.world_size and runtime.is_main:
        print(f"warning: checkpoint written by {len(states)} process(es), resumed on {runtime.world_size}: "
              "data order and augmentation differ from an uninterrupted run", file=sys.stderr)
    return states[runtime.rank] if len(states) == runtime.world_size else states[0]


def save_checkpoint(run: Run) -> None:
    """Write ``checkpoint.pth`` atomically (rank 0), with every rank's RNG state."""
    rng = distributed.gather(rng_state(), run.runtime)
    if run.last_checkpoint is None:
        advice = "free space (or fix the folder) and start again (--overwrite replaces this run)"
    else:
        advice = f"free space (or fix the folder) and continue with --resume {run.last_checkpoint}"
    _write_on_main(run.runtime, lambda: save_atomic(run.checkpoint_state(rng), run.checkpoint_path), advice)
    run.last_checkpoint = run.checkpoint_path


def train_one_epoch(run: Run, interrupt: Interrupt, show_progress: bool) -> EpochProgress:
    """The rest of the current epoch, added to ``run.progress``, which it returns.
    Ctrl-C saves a checkpoint and exits with 130; a non-finite loss raises
    :class:`TrainingDiverged` before the update."""
    recipe, runtime, model, position, progress = run.recipe, run.runtime, run.model, run.position, run.progress
    sets_keep_rate = reduces_tokens(recipe)
    loader = train_loader(run.train_set, recipe, runtime, position.epoch, skip_batches=position.step_in_epoch)
    start_epoch_lr(run.scheduler, recipe, position.epoch, position.global_step)  # per-group lr_scale included
    model.train()
    if recipe.dynamicvit.enabled:
        set_backbone_frozen(unwrap_model(model), position.epoch < recipe.dynamicvit.freeze_epochs)
    earlier_seconds, started = progress.seconds, time.perf_counter()
    with tqdm(total=run.steps_per_epoch, initial=position.step_in_epoch, disable=not (show_progress and runtime.is_main),
              desc=f"epoch {position.epoch + 1}/{recipe.train.epochs}", dynamic_ncols=True) as bar:  # closed on errors too
        for index, (images, targets) in enumerate(loader, start=position.step_in_epoch):
            if index >= run.steps_per_epoch:
                break
            images, targets = images.to(runtime.device), targets.to(runtime.device)
            keep_rate = run.keep_rate(position.epoch + index / run.steps_per_epoch)
            if sets_keep_rate:
                set_keep_rate(unwrap_model(model), keep_rate)
                if run.ema is not None:
                    set_keep_rate(run.ema.module, keep_rate)
            if run.mixup is not None:
                images, targets = run.mixup(images, targets)
            with autocast(runtime.device, recipe.train.amp):
                loss = run.criterion(model, images, targets)
            diverged, interrupted = distributed.any_across([not math.isfinite(loss.item()), interrupt.requested],
                                                           runtime)
            if diverged:
                value = loss.item() if not math.isfinite(loss.item()) else "not finite on another process"
                raise TrainingDiverged(f"loss is {value} at epoch {position.epoch + 1}, step {index + 1}; nothing of "
                                       f"this step was applied; {_where_to_restart(run)}")
            for hook in update_hooks():
                hook(run)
            _update(run, loss)
            position.global_step += 1
            position.step_in_epoch = index + 1
            run.scheduler.step_update(position.global_step)
            if run.ema is not None:
                run.ema.update(model, step=position.global_step)
            progress.loss_sum += loss.item()
            progress.steps += 1
            progress.images += images.shape[0]
            progress.seconds = earlier_seconds + time.perf_counter() - started
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}",
                            keep="/".join(f"{rate:.3f}" for rate in (keep_rate if isinstance(keep_rate, list) else [keep_rate]))
                            if sets_keep_rate else "-",
                            img_s=f"{progress.images / progress.seconds:.0f}")
            bar.update(1)
            if interrupted:
                save_checkpoint(run)
                bar.close()
                print(f"interrupted: saved {run.checkpoint_path}; continue with --resume {run.checkpoint_path}")
                sys.exit(130)
    return progress


def _where_to_restart(run: Run) -> str:
    """After a diverged step: the last good checkpoint of this run, or that there is none."""
    remedy = "a lower optimizer.lr, optimizer.clip_grad, or train.amp: none"
    if run.last_checkpoint is None:
        return (f"no checkpoint of this run was written yet (it diverged in its first epoch): start again with "
                f"{remedy} (--overwrite replaces this run)")
    return f"the last good checkpoint is {run.last_checkpoint}: --resume {run.last_checkpoint} with {remedy}"


def _update(run: Run, loss: torch.Tensor) -> None:
    """Backward, optional clipping and the optimizer step, through the fp16 scaler."""
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.recipe.optimizer.clip_grad:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), run.recipe.optimizer.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()


def epoch_metrics(run: Run, progress: EpochProgress) -> dict[str, Any]:
    """The line ``metrics.jsonl`` gets for the epoch just trained: loss, lr, keep rate,
    speed, and top-1/top-5 of the model (and of its EMA) on the evaluation split. Loss and
    speed are null when no step of the epoch is known (a checkpoint of an older version
    resumed at an epoch's end), never a made-up 0."""
    recipe, amp = run.recipe, run.recipe.train.amp
    metrics = {"epoch": run.position.epoch + 1,
               "train_loss": progress.loss_sum / progress.steps if progress.steps else None,
               "lr": run.optimizer.param_groups[0]["lr"],
               "keep_rate": run.keep_rate(run.position.epoch + 1) if reduces_tokens(recipe) else None,
               "train_images_per_second": progress.images / progress.seconds if progress.steps else None,
               **accuracy(run.model, run.evaluation, run.runtime, amp)}
    if run.ema is not None:
        metrics.update({f"ema_{k}": v for k, v in accuracy(run.ema.module, run.evaluation, run.runtime, amp).items()})
    return metrics


__all__ = ["train", "run_training", "start_run", "resume_run", "train_one_epoch", "save_checkpoint", "epoch_metrics",
           "run_summary", "update_hook", "Run", "Position", "EpochProgress", "Interrupt", "TrainingDiverged"]
