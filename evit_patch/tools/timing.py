"""Forward-pass timing of several models side by side, for speed ratios that drift spares.

Models are timed interleaved in a rotating order, so a slow spell of the machine hits
all of them alike and per-repeat ratios can be paired (medians of ratios, not ratios of
medians).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Optional

import torch
from torch import nn


def timed_forward(model: nn.Module, images: torch.Tensor, dtype: Optional[torch.dtype] = None) -> float:
    """Seconds of one forward pass (synchronized on CUDA; under autocast to ``dtype`` when given)."""
    autocast = torch.autocast(images.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    if images.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast:
        model(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.inference_mode()
def interleaved_images_per_second(models: dict[str, nn.Module], images: torch.Tensor, repeats: int = 5,
                                  dtype: Optional[torch.dtype] = None, warmup: int = 1) -> dict[str, list[float]]:
    """Images/s of each model (in eval mode) in every repeat, timed interleaved in rotating order."""
    names = list(models)
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            timed_forward(model, images, dtype)
    timings: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            timings[name].append(images.shape[0] / timed_forward(models[name], images, dtype))
    return timings


def images_per_second(models: dict[str, nn.Module], images: torch.Tensor, repeats: int = 5,
                      dtype: Optional[torch.dtype] = None) -> dict[str, float]:
    """Median images/s of each model, timed interleaved."""
    timings = interleaved_images_per_second(models, images, repeats, dtype)
    return {name: statistics.median(values) for name, values in timings.items()}
