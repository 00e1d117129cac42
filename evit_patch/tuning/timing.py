"""Timing of several models side by side, for speed ratios that drift spares: the one timing
the tuner, ``evaluate`` and the benchmarks share.

Calls (a forward pass, a training step) are timed interleaved in a rotating order, so a
slow spell of the machine hits all of them alike and per-repeat ratios can be paired
(medians of ratios, not ratios of medians).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

Clock = Callable[[], float]
"""Seconds since some fixed point (``time.perf_counter``; a test injects its own)."""


def positive_int(text: str) -> int:
    """An argparse type for counts that must be at least 1 (batch sizes, repeats, calls)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(call: Callable[[], object], device: torch.device, clock: Optional[Clock] = None) -> float:
    """Seconds of one ``call()``, synchronized on CUDA, by ``clock`` (default ``time.perf_counter``)."""
    clock = clock or time.perf_counter
    _synchronize(device)
    start = clock()
    call()
    _synchronize(device)
    return clock() - start


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
                      repeats: int = 5, warmup: int = 1, calls_per_repeat: int = 1,
                      clock: Optional[Clock] = None) -> dict[str, list[float]]:
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
            rates[name].append(items_per_call * calls_per_repeat / timed_call(repeated(calls[name]), device, clock))
    return rates


@torch.inference_mode()
def interleaved_images_per_second(models: dict[str, nn.Module], images: torch.Tensor, repeats: int = 5,
                                  dtype: Optional[torch.dtype] = None, warmup: int = 1,
                                  calls_per_repeat: int = 1, clock: Optional[Clock] = None) -> dict[str, list[float]]:
    """Inference images/s of each model (put in eval mode) in every repeat, timed interleaved."""

    def forward(model: nn.Module) -> Callable[[], object]:
        def call() -> object:
            with autocast_to(images.device, dtype):
                return model(images)
        return call

    for model in models.values():
        model.eval()
    return interleaved_rates({name: forward(model) for name, model in models.items()}, images.shape[0],
                             images.device, repeats, warmup, calls_per_repeat, clock)


@dataclass(frozen=True)
class PairedSpeed:
    """A model's speed beside a reference timed in the same repeats."""

    images_per_second: float  # median over repeats
    speedup: float  # median of the per-repeat ratios to the reference (not the ratio of medians)
    quartiles: tuple[float, float]  # of those ratios: how far the median can be trusted

    @property
    def spread(self) -> float:
        """Half the interquartile range of the ratios, relative to their median."""
        return (self.quartiles[1] - self.quartiles[0]) / (2 * self.speedup)


UNTRUSTED_SPREAD = 0.05
"""A spread above which a speed-up is reported with a warning: on a quiet machine the ratios
of paired repeats stay within a few percent; another job running makes them scatter."""


def paired_speeds(models: dict[str, nn.Module], images: torch.Tensor, repeats: int = 7,
                  dtype: Optional[torch.dtype] = None, same_as: Optional[dict[str, str]] = None,
                  calls_per_repeat: int = 1, clock: Optional[Clock] = None) -> dict[str, PairedSpeed]:
    """Images/s of each model and its speed-up over the first one, paired repeat by repeat
    (:func:`interleaved_images_per_second`). A model named in ``same_as`` is not timed: it
    takes the figures of the model named there, whose architecture it shares (the same
    patch with other weights), so one architecture gets one figure."""
    same_as = same_as or {}
    timed = {name: model for name, model in models.items() if name not in same_as}
    rates = interleaved_images_per_second(timed, images, repeats, dtype, calls_per_repeat=calls_per_repeat, clock=clock)
    reference = rates[next(iter(models))]
    speeds = {}
    for name, values in rates.items():
        ratios = [value / base for value, base in zip(values, reference)]
        low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        speeds[name] = PairedSpeed(statistics.median(values), statistics.median(ratios), (low, high))
    return {name: speeds[same_as.get(name, name)] for name in models}


def spread_warning(speeds: dict[str, PairedSpeed]) -> Optional[str]:
    """One line when a speed-up cannot be trusted (its paired repeats scatter), else None."""
    worst = max(speeds.values(), key=lambda speed: speed.spread)
    if worst.spread <= UNTRUSTED_SPREAD:
        return None
    return (f"warning: the speed-ups scatter by up to +-{100 * worst.spread:.0f}% between repeats (another job on "
            "this machine?); rerun on a quiet machine before trusting them")
