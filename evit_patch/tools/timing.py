"""Timing of several models side by side, for speed ratios that drift spares.

Calls (a forward pass, a training step) are timed interleaved in a rotating order, so a
slow spell of the machine hits all of them alike and per-repeat ratios can be paired
(medians of ratios, not ratios of medians).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn


def positive_int(text: str) -> int:
    """An argparse type for counts that must be at least 1 (batch sizes, repeats, calls)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(call: Callable[[], object], device: torch.device) -> float:
    """Seconds of one ``call()``, synchronized on CUDA."""
    _synchronize(device)
    start = time.perf_counter()
    call()
    _synchronize(device)
    return time.perf_counter() - start


def autocast_to(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype``, or nothing for full precision."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def timed_forward(model: nn.Module, images: torch.Tensor, dtype: Optional[torch.dtype] = None) -> float:
    """Seconds of one forward pass (under autocast to ``dtype`` when given)."""

    def forward() -> None:
        with autocast_to(images.device, dtype):
            model(images)

    return timed_call(forward, images.device)


def interleaved_rates(calls: dict[str, Callable[[], object]], items_per_call: int, device: torch.device,
                      repeats: int = 5, warmup: int = 1, calls_per_repeat: int = 1) -> dict[str, list[float]]:
    """Items per second of each call in every repeat, timed interleaved in rotating order.

    A repeat times ``calls_per_repeat`` calls back to back, which averages out jitter
    shorter than that (a call of a few milliseconds is at the mercy of every interrupt)."""
    names = list(calls)
    for call in calls.values():
        for _ in range(warmup):
            call()

    def repeated(call: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls_per_repeat):
                call()
        return run

    rates: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            rates[name].append(items_per_call * calls_per_repeat / timed_call(repeated(calls[name]), device))
    return rates


@torch.inference_mode()
def interleaved_images_per_second(models: dict[str, nn.Module], images: torch.Tensor, repeats: int = 5,
                                  dtype: Optional[torch.dtype] = None, warmup: int = 1,
                                  calls_per_repeat: int = 1) -> dict[str, list[float]]:
    """Inference images/s of each model (put in eval mode) in every repeat, timed interleaved."""

    def forward(model: nn.Module) -> Callable[[], object]:
        def call() -> object:
            with autocast_to(images.device, dtype):
                return model(images)
        return call

    for model in models.values():
        model.eval()
    return interleaved_rates({name: forward(model) for name, model in models.items()}, images.shape[0],
                             images.device, repeats, warmup, calls_per_repeat)


def images_per_second(models: dict[str, nn.Module], images: torch.Tensor, repeats: int = 5,
                      dtype: Optional[torch.dtype] = None) -> dict[str, float]:
    """Median inference images/s of each model, timed interleaved."""
    timings = interleaved_images_per_second(models, images, repeats, dtype)
    return {name: statistics.median(values) for name, values in timings.items()}
