"""Keep-rate schedules: constant, or 1.0 then a cosine warm-down to the target."""

from __future__ import annotations

import math
from typing import Literal, overload


@overload
def keep_rate_at(epoch: float, target: float, kind: Literal["constant", "cosine"] = "constant",
                 start_epoch: float = 0.0, epochs: float = 0.0) -> float: ...


@overload
def keep_rate_at(epoch: float, target: list[float], kind: Literal["constant", "cosine"] = "constant",
                 start_epoch: float = 0.0, epochs: float = 0.0) -> list[float]: ...


def keep_rate_at(epoch: float, target: float | list[float], kind: Literal["constant", "cosine"] = "constant",
                 start_epoch: float = 0.0, epochs: float = 0.0) -> float | list[float]:
    """Keep rate at a (fractional) epoch; a target per layer gives a rate per layer, each on
    the same schedule.

    ``constant``: 1.0 before ``start_epoch``, then ``target``. ``cosine``: 1.0 until
    ``start_epoch``, then ``target + (1 - target) * (1 + cos(pi * t)) / 2`` with ``t``
    going from 0 to 1 over ``epochs`` epochs, then ``target``.
    """
    if isinstance(target, list):
        return [keep_rate_at(epoch, rate, kind, start_epoch, epochs) for rate in target]
    if kind == "constant" or epochs <= 0:
        return target if epoch >= start_epoch else 1.0
    progress = (epoch - start_epoch) / epochs
    if progress <= 0:
        return 1.0
    if progress >= 1:
        return target
    return target + (1.0 - target) * (1.0 + math.cos(math.pi * progress)) / 2.0
