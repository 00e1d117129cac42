"""Accuracy and side-by-side speed of models, shared by fine-tuning and evaluate."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from evit_patch.distributed import Runtime, sum_across

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, runtime: Runtime, amp: str = "none") -> dict[str, float]:
    """Top-1 and top-5 in percent over the loader (summed over all processes)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    for images, labels in loader:
        images, labels = images.to(runtime.device), labels.to(runtime.device)
        with autocast(runtime.device, amp):
            logits = model(images)
        top = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top == labels.unsqueeze(-1)
        counts += torch.tensor([hits[:, 0].sum().item(), hits.any(-1).sum().item(), labels.numel()], dtype=torch.float64)
    model.train(was_training)
    top1, top5, total = sum_across(counts, runtime).tolist()
    return {"top1": 100.0 * top1 / max(total, 1), "top5": 100.0 * top5 / max(total, 1)}


@torch.inference_mode()
def interleaved_images_per_second(models: dict[str, nn.Module], images: torch.Tensor, repeats: int = 5,
                                  amp: str = "none") -> dict[str, list[float]]:
    """Images/s of each model in every repeat, timed interleaved in rotating order, so
    drift of the machine hits all alike and per-repeat ratios can be paired."""
    names = list(models)
    for model in models.values():
        model.eval()
        model(images)
    timings: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            if images.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with autocast(images.device, amp):
                models[name](images)
            if images.is_cuda:
                torch.cuda.synchronize()
            timings[name].append(images.shape[0] / (time.perf_counter() - start))
    return timings


def images_per_second(models: dict[str, nn.Module], images: torch.Tensor, repeats: int = 5,
                      amp: str = "none") -> dict[str, float]:
    """Median images/s of each model, timed interleaved in rotating order."""
    timings = interleaved_images_per_second(models, images, repeats, amp)
    return {name: statistics.median(values) for name, values in timings.items()}
