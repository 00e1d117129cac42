"""Batches of a fine-tuning run: shuffled in an order fixed by (seed, epoch), resumable
mid-epoch, sharded across processes, and mixed (mixup/cutmix) when the recipe asks."""

from __future__ import annotations

import itertools
from typing import Iterator, Optional, Sized

import torch
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from evit_patch.train.distributed import Runtime
from evit_patch.train.recipe import DataConfig, Recipe


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


def train_sampler(dataset: Sized, recipe: Recipe, rank: int, world_size: int, epoch: int,
                  generator: Optional[torch.Generator] = None) -> Sampler[int]:
    """This process's indices of an epoch: timm's ``RepeatAugSampler`` under repeated
    augmentation (each image three times, on different processes; per process about
    1/world_size of the set, rounded down to 256 images, as DeiT's ``RASampler``),
    else ``DistributedSampler`` across processes, or one shuffle alone. The order depends
    only on (seed, epoch); with seed 0 the repeated-augmentation order is DeiT's. Alone,
    the shuffle draws from ``generator`` (the loader's own, shared as it always was)."""
    if recipe.data.repeated_augmentation:
        sampler: Sampler[int] = RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True)
        sampler.set_epoch(recipe.train.seed * 100_003 + epoch)
    elif world_size > 1:
        sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=recipe.train.seed)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    return sampler


def train_loader(dataset: Dataset, recipe: Recipe, runtime: Runtime, epoch: int, skip_batches: int = 0) -> DataLoader:
    """Shuffled batches whose order depends only on (seed, epoch), so a resumed run sees
    the same data in the same order; the first ``skip_batches`` are left out."""
    generator = torch.Generator().manual_seed(recipe.train.seed * 100_003 + epoch)
    sampler = train_sampler(dataset, recipe, runtime.rank, runtime.world_size, epoch, generator)
    return DataLoader(dataset, batch_size=recipe.train.batch_size,
                      sampler=SkipSampler(sampler, skip_batches * recipe.train.batch_size), drop_last=True,
                      num_workers=recipe.data.workers, generator=generator)


def eval_loader(dataset: Dataset, recipe: Recipe, runtime: Runtime) -> DataLoader:
    """This process's share of the evaluation split, in order."""
    return DataLoader(dataset, batch_size=recipe.train.eval_batch_size,
                      sampler=ShardSampler(len(dataset), runtime.rank, runtime.world_size),
                      num_workers=recipe.data.workers)


def build_mixup(config: DataConfig, num_classes: int) -> Optional[Mixup]:
    if config.mixup <= 0 and config.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing,
                 num_classes=num_classes)
