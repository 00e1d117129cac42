"""The settings worth running: those no other measured setting beats on both speed and
agreement, and the one of them a target asks for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Optional, Sequence, TypeVar

SettingT = TypeVar("SettingT")


@dataclass(frozen=True)
class Measured(Generic[SettingT]):
    """A setting with what was measured of it."""

    setting: SettingT
    speedup: float  # over the unpatched model, paired repeats on the user's device
    agreement: float  # top-1 agreement with the unpatched model


class UnreachableTarget(ValueError):
    """No measured setting meets the target; the message names the closest one found."""


def dominates(first: Measured, second: Measured) -> bool:
    """At least as fast and as agreeing, and better in one."""
    return (first.speedup >= second.speedup and first.agreement >= second.agreement
            and (first.speedup > second.speedup or first.agreement > second.agreement))


def pareto_front(measured: Sequence[Measured[SettingT]]) -> list[Measured[SettingT]]:
    """The measured settings no other dominates, fastest first."""
    front = [point for point in measured if not any(dominates(other, point) for other in measured)]
    return sorted(front, key=lambda point: (-point.speedup, -point.agreement))


def choose(front: Sequence[Measured[SettingT]], min_speedup: Optional[float] = None,
           max_agreement_loss: Optional[float] = None) -> Measured[SettingT]:
    """The setting a target asks for: with ``min_speedup``, the most agreeing at least that
    fast; with ``max_agreement_loss`` (1 - agreement), the fastest within it; with both, the
    fastest meeting both; with neither, the fastest. A target no setting meets raises
    :class:`UnreachableTarget` naming the fastest (or most agreeing) one measured."""
    if not front:
        raise ValueError("nothing was measured to choose from")
    meets = [point for point in front
             if (min_speedup is None or point.speedup >= min_speedup)
             and (max_agreement_loss is None or 1 - point.agreement <= max_agreement_loss)]
    if not meets:
        fastest = max(front, key=lambda point: point.speedup)
        closest = max(front, key=lambda point: point.agreement)
        asked = [f"{min_speedup}x fast" if min_speedup is not None else "",
                 f"within {max_agreement_loss:.1%} of agreement lost" if max_agreement_loss is not None else ""]
        raise UnreachableTarget(
            f"no measured setting is {' and '.join(part for part in asked if part)}: the fastest found runs "
            f"{fastest.speedup:.2f}x at {fastest.agreement:.1%} agreement, the most agreeing "
            f"{closest.speedup:.2f}x at {closest.agreement:.1%}")
    if min_speedup is not None and max_agreement_loss is None:
        return max(meets, key=lambda point: (point.agreement, point.speedup))
    return max(meets, key=lambda point: (point.speedup, point.agreement))
