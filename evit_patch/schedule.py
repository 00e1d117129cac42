"""Keep-rate schedules: constant, or 1.0 then a cosine warm-down to the target."""

from __future__ import annotations

import math

from evit_patch.config import KeepRateScheduleConfig


def keep_rate_at(epoch: float, target: float, schedule: KeepRateScheduleConfig) -> float:
    """Keep rate at a (fractional) epoch.

    ``cosine``: 1.0 until ``start_epoch``, then ``target + (1 - target) * (1 + cos(pi * t)) / 2``
    with ``t`` going from 0 to 1 over ``epochs`` epochs, then ``target``.
    """
    if schedule.kind == "constant" or schedule.epochs <= 0:
        return target if epoch >= schedule.start_epoch else 1.0
    progress = (epoch - schedule.start_epoch) / schedule.epochs
    if progress <= 0:
        return 1.0
    if progress >= 1:
        return target
    return target + (1.0 - target) * (1.0 + math.cos(math.pi * progress)) / 2.0
