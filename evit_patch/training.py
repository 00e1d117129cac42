"""The pieces a fine-tuning run is made of: model, data, optimizer, loss, RNG state."""

from __future__ import annotations

import random
import itertools
from typing import Iterator, Optional

import numpy as np
import timm
import timm.optim
import timm.scheduler
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from evit_patch.checkpoint import load_weights
from evit_patch.config import DataConfig, ModelConfig, Recipe, TeacherConfig
from evit_patch.distributed import Runtime
from evit_patch.dynamicvit import dynamicvit_param_groups


def build_model(config: ModelConfig | TeacherConfig) -> nn.Module:
    """A timm model with hub weights (``pretrained``), hub-format weights from a local file
    (``pretrained_file``, adapted by timm to the model's size), and/or an exact state_dict."""
    overlay = {"pretrained_cfg_overlay": {"file": config.pretrained_file}} if config.pretrained_file else {}
    pretrained = config.pretrained or bool(config.pretrained_file)
    model = timm.create_model(config.name, pretrained=pretrained, **overlay, **config.kwargs)
    if config.checkpoint:
        load_weights(model, config.checkpoint)
    return model


class SkipSampler(Sampler[int]):
    """A sampler's indices after the first ``skip``: resuming mid-epoch neither loads nor
    augments (so neither consumes random numbers for) the samples already trained on."""

    def __init__(self, sampler: Sampler[int], skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``: each sample evaluated exactly once over
    all processes (``DistributedSampler`` pads with repeats, which would count twice)."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(dataset: Dataset, recipe: Recipe, runtime: Runtime, epoch: int, skip_batches: int = 0) -> DataLoader:
    """Shuffled batches whose order depends only on (seed, epoch), so a resumed run sees
    the same data in the same order; the first ``skip_batches`` are left out."""
    generator = torch.Generator().manual_seed(recipe.train.seed * 100_003 + epoch)
    if runtime.distributed:
        sampler = DistributedSampler(dataset, runtime.world_size, runtime.rank, shuffle=True, seed=recipe.train.seed)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(dataset, batch_size=recipe.train.batch_size,
                      sampler=SkipSampler(sampler, skip_batches * recipe.train.batch_size), drop_last=True,
                      num_workers=recipe.data.workers, generator=generator)


def eval_loader(dataset: Dataset, recipe: Recipe, runtime: Runtime) -> DataLoader:
    """This process's share of the evaluation split, in order."""
    return DataLoader(dataset, batch_size=recipe.train.eval_batch_size,
                      sampler=ShardSampler(len(dataset), runtime.rank, runtime.world_size),
                      num_workers=recipe.data.workers)


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


def build_mixup(config: DataConfig, num_classes: int) -> Optional[Mixup]:
    if config.mixup <= 0 and config.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing,
                 num_classes=num_classes)


class DistillationLoss(nn.Module):
    """Cross-entropy (soft targets with mixup) plus DeiT-style distillation from a teacher.

    A student with a distillation head returns ``(cls, dist)`` in training: the class
    head learns the labels, the distillation head the teacher.
    """

    def __init__(self, data: DataConfig, teacher: Optional[nn.Module], teacher_config: Optional[TeacherConfig]) -> None:
        super().__init__()
        self.soft_targets = data.mixup > 0 or data.cutmix > 0
        self.label_smoothing = data.label_smoothing
        self.teacher = teacher
        self.config = teacher_config

    def forward(self, images: Tensor, outputs: Tensor | tuple[Tensor, Tensor], targets: Tensor) -> Tensor:
        logits, distill_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        if self.soft_targets:
            base = SoftTargetCrossEntropy()(logits, targets)
        else:
            base = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        if self.teacher is None:
            return base
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        if self.config.kind == "soft":
            tau = self.config.tau
            distill = F.kl_div(F.log_softmax(distill_logits / tau, -1), F.log_softmax(teacher_logits / tau, -1),
                               reduction="batchmean", log_target=True) * tau * tau
        else:
            distill = F.cross_entropy(distill_logits, teacher_logits.argmax(-1))
        return (1 - self.config.alpha) * base + self.config.alpha * distill


def rng_state() -> dict:
    """Every random generator a step can touch, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
