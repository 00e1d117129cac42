"""Keep rates for a MAC budget or for a higher input resolution at the same cost.

MACs of a patched model grow monotonically with the keep rate, in steps (token counts
are ceilings), so the largest affordable keep rate is found by bisection on the exact
fvcore count of the model itself, not on a cost model of it.
"""

from __future__ import annotations

import copy
from typing import Sequence

from torch import nn

from evit_patch.macs import at_input_size, count_macs
from evit_patch.patch import apply_evit, is_patched, remove_evit, set_keep_rate

_RESOLUTION = 1e-4  # keep-rate precision of the search; token counts move in steps of 1/n > 1e-3


def _unpatched_copy(model: nn.Module, img_size: int | tuple[int, int] | None) -> nn.Module:
    """A copy of ``model`` without EViT, resized when ``img_size`` asks for it."""
    work = copy.deepcopy(model)
    if is_patched(work):
        remove_evit(work)
    return work if img_size is None else at_input_size(work, img_size)


def keep_rate_for_budget(model: nn.Module, target_macs: float, layers: Sequence[int],
                         img_size: int | tuple[int, int] | None = None, *, fuse: bool = True) -> float:
    """The largest keep rate at which EViT on ``layers`` costs at most ``target_macs``.

    ``model`` is not changed (a copy is measured). ``img_size`` defaults to the model's
    native size. Raises ``ValueError`` when even keeping one token per layer costs more.
    """
    if not target_macs > 0:
        raise ValueError(f"target_macs must be a positive number of multiply-accumulates, got {target_macs!r}")
    work = apply_evit(_unpatched_copy(model, img_size), layers, 1.0, fuse=fuse)
    macs_at = lambda rate: (set_keep_rate(work, rate), count_macs(work))[1]  # noqa: E731
    if macs_at(1.0) <= target_macs:
        return 1.0
    low, high = _RESOLUTION, 1.0
    cheapest = macs_at(low)
    if cheapest > target_macs:
        raise ValueError(
            f"no keep rate reaches {target_macs / 1e9:.3f} GMACs on layers {list(layers)}: even keep "
            f"{low} costs {cheapest / 1e9:.3f} GMACs; reorganize earlier layers or lower the resolution"
        )
    while high - low > _RESOLUTION:
        middle = (low + high) / 2
        low, high = (middle, high) if macs_at(middle) <= target_macs else (low, middle)
    return low


def keep_rate_for_resolution(model: nn.Module, img_size: int | tuple[int, int], layers: Sequence[int],
                             *, fuse: bool = True) -> float:
    """The largest keep rate at which ``model`` at ``img_size`` with EViT on ``layers``
    costs no more than the unpatched model at its native resolution (the paper's
    "higher resolution at the same cost")."""
    native = count_macs(_unpatched_copy(model, None))
    return keep_rate_for_budget(model, native, layers, img_size, fuse=fuse)
