"""torch.distributed set-up from torchrun's environment (one process per device)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """Where this process runs and which rank it is."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start() -> Runtime:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        return Runtime(device)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Runtime(device, dist.get_rank(), world_size)


def stop(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sum_across(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Sum a tensor over all processes (identity when alone)."""
    if runtime.distributed:
        values = values.to(runtime.device)
        dist.all_reduce(values)
    return values


def any_across(flags: list[bool], runtime: Runtime) -> list[bool]:
    """Each flag true on any process: ranks decide together to stop (a NaN loss or Ctrl-C
    seen by one rank only would otherwise leave the others waiting in a collective)."""
    if not runtime.distributed:
        return flags
    values = torch.tensor([float(flag) for flag in flags], device=runtime.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(value) for value in values.tolist()]


def gather(value: object, runtime: Runtime) -> list:
    """One picklable value from every process, in rank order (``[value]`` when alone)."""
    if not runtime.distributed:
        return [value]
    values: list = [None] * runtime.world_size
    dist.all_gather_object(values, value)
    return values
