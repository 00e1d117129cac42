"""Checks of user arguments, done before anything is changed."""

from __future__ import annotations

import numbers
from typing import Sequence


def paper_layers(depth: int) -> list[int]:
    """The paper's placement scaled to ``depth`` blocks: the first block of each of the last
    three quarters, ``depth * i // 4`` for i = 1, 2, 3 (DeiT's 12 blocks -> 3, 6, 9; LV-ViT-S's
    16 -> 4, 8, 12; LV-ViT-M's 20 -> 5, 10, 15; 24 -> 6, 12, 18; 6 -> 1, 3, 4). Repeats at
    depths under 4 collapse, so a 2-block model reorganizes at block 0 and 1 only once each."""
    return sorted({depth * quarter // 4 for quarter in (1, 2, 3)})


def validated_layers(layers: Sequence[int] | None, depth: int) -> list[int]:
    """Sorted distinct block indices in ``[0, depth)``; :func:`paper_layers` when None."""
    if layers is None:
        return paper_layers(depth)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of block indices in [0, {depth}), got {layers!r}")
    if len(layers) == 0:
        raise ValueError(f"layers must name at least one block index in [0, {depth})")
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"layers must hold integers in [0, {depth}), got {index!r} in {list(layers)!r}")
        if not 0 <= index < depth:
            raise ValueError(f"layers: block index {index} is out of range; the model has blocks 0..{depth - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat a block index, got {list(layers)!r}")
    return sorted(int(index) for index in layers)


def validated_placement(layers: Sequence[int] | None, keep_rate: float | Sequence[float],
                        depth: int) -> tuple[list[int], list[float]]:
    """:func:`validated_layers` and :func:`validated_keep_rates` together: the layers sorted,
    and a keep rate given per layer still with its own layer, in whatever order the
    layers came."""
    ordered = validated_layers(layers, depth)
    rates = validated_keep_rates(keep_rate, len(ordered))
    given = ordered if layers is None else [int(index) for index in layers]
    rate_of = dict(zip(given, rates))
    return ordered, [rate_of[index] for index in ordered]


def validated_keep_rates(keep_rate: float | Sequence[float], count: int) -> list[float]:
    """One keep rate in (0, 1] per reorganization layer."""
    rates = list(keep_rate) if isinstance(keep_rate, Sequence) and not isinstance(keep_rate, str) else [keep_rate] * count
    if len(rates) != count:
        raise ValueError(f"keep_rate: got {len(rates)} rates for {count} layers; give one float or one per layer")
    for rate in rates:
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
            raise TypeError(f"keep_rate must be a float in (0, 1], got {rate!r}")
        if not 0.0 < float(rate) <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1] (fraction of image tokens kept), got {rate!r}")
    return [float(rate) for rate in rates]
