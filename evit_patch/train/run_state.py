"""What a fine-tuning run carries from step to step, and how it is watched and interrupted."""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from timm.data import Mixup
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3, unwrap_model
from torch import nn
from torch.utils.data import DataLoader, Dataset

from evit_patch.train import distributed
from evit_patch.train.criterion import Criterion
from evit_patch.train.methods import method_label
from evit_patch.train.recipe import Recipe, recipe_to_dict, reduces_tokens
from evit_patch.train.schedule import keep_rate_at


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite."""


UpdateHook = Callable[["Run"], None]
_UPDATE_HOOKS: list[UpdateHook] = []


@contextlib.contextmanager
def update_hook(hook: UpdateHook) -> Iterator[None]:
    """Call ``hook(run)`` before each optimizer update of every run trained inside the block
    (``run.optimizer`` then holds the lr and weight decay that update uses): a way to watch
    training, e.g. from a test or a progress reporter, without patching the loop."""
    _UPDATE_HOOKS.append(hook)
    try:
        yield
    finally:
        _UPDATE_HOOKS.remove(hook)


def update_hooks() -> tuple[UpdateHook, ...]:
    """The hooks :func:`update_hook` holds now."""
    return tuple(_UPDATE_HOOKS)


@dataclass
class Position:
    """Where a run is: finished epochs, steps into the current one, updates in all."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


@dataclass
class EpochProgress:
    """The current epoch so far, on this process: kept in checkpoints so that the metrics
    line of an epoch interrupted and resumed covers all its steps."""

    loss_sum: float = 0.0
    steps: int = 0
    images: int = 0
    seconds: float = 0.0


class Interrupt:
    """Turns Ctrl-C into a request honoured at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "Interrupt":
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


@dataclass
class Run:
    """Everything a run carries from step to step."""

    recipe: Recipe
    runtime: distributed.Runtime
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    scaler: torch.amp.GradScaler
    ema: Optional[ModelEmaV3]
    criterion: Criterion
    mixup: Optional[Mixup]
    train_set: Dataset
    evaluation: DataLoader
    steps_per_epoch: int
    position: Position = field(default_factory=Position)
    progress: EpochProgress = field(default_factory=EpochProgress)
    last_checkpoint: Optional[Path] = None  # the newest checkpoint of this run: written by it, or resumed from

    @property
    def output(self) -> Path:
        return Path(self.recipe.train.output_dir)

    @property
    def checkpoint_path(self) -> Path:
        return self.output / "checkpoint.pth"

    def checkpoint_state(self, rng: list[dict]) -> dict[str, Any]:
        """What ``checkpoint.pth`` holds (``rng``: every rank's RNG state)."""
        return {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "position": vars(self.position).copy(),
            "epoch_progress": vars(self.progress).copy(),
            "rng": rng,  # one entry per rank: each process draws its own augmentation
            "recipe": recipe_to_dict(self.recipe),
        }

    def keep_rate(self, epoch: float) -> float | list[float]:
        """The recipe's keep rate (or one per layer) at a (fractional) epoch."""
        schedule = self.recipe.keep_rate_schedule
        return keep_rate_at(epoch, self.recipe.reduction.keep_rate, schedule.kind, schedule.start_epoch, schedule.epochs)


def run_summary(recipe: Recipe, output: Path, resuming: bool) -> str:
    """One line, printed before anything is built: what the run trains, from what, and where it writes."""
    model = recipe.model
    start = model.checkpoint or model.pretrained_file or ("timm's hub weights" if model.pretrained else "random weights")
    method = method_label(recipe) or "no token method"
    where = f" at blocks {recipe.reduction.layers}" if reduces_tokens(recipe) else ""
    steps = f" (at most {recipe.train.max_steps_per_epoch} steps each)" if recipe.train.max_steps_per_epoch else ""
    return (f"{'resuming' if resuming else 'fine-tuning'} {model.name} with {method}{where} from {start}: "
            f"{recipe.train.epochs} epoch(s){steps} of {recipe.train.batch_size} images per step and process; "
            f"writing {output}/ (checkpoint.pth and metrics.jsonl every epoch, model.safetensors at the end)")
