"""The first, cheap look at every candidate: a quality pass over a few calibration images, after
which only the promising share goes on to the whole calibration split (one round of successive
halving). On a large model at batch 1 the quality passes are most of a tune's time, and most
candidates are plainly beaten: as costly as another and further from the unpatched answers.

Promising is judged on two figures known before any timing: the MAC ratio (what speed a
setting can hope for) and the mean KL to the unpatched outputs on the screening images (a few
dozen images give agreement in coarse steps; the KL moves with every image). Candidates are
ranked in successive non-dominated fronts of the two, and whole fronts are kept until the
share is reached: a candidate screened out is beaten on both by one that goes on."""

from __future__ import annotations

import math
from typing import Hashable, Mapping, TypeVar

SCREEN_IMAGES = 32
"""Calibration images of the first look; with fewer calibration images than four times this,
there is no screen (every candidate gets the whole split)."""
SURVIVING_SHARE = 1 / 3
"""The share of candidates (at least) that goes on to the whole calibration split."""

Setting = TypeVar("Setting", bound=Hashable)


def screening_size(calibration_images: int) -> int:
    """How many of the calibration images the first look takes: all of them (no screen) when
    there are fewer than four times :data:`SCREEN_IMAGES`, else a quarter, at least that many."""
    if calibration_images < 4 * SCREEN_IMAGES:
        return calibration_images
    return max(SCREEN_IMAGES, calibration_images // 4)


def _beats(first: tuple[float, float], second: tuple[float, float]) -> bool:
    """``(mac_ratio, mean_kl)``: at least as cheap and as close, and better in one."""
    return (first[0] >= second[0] and first[1] <= second[1]) and (first[0] > second[0] or first[1] < second[1])


def fronts(points: Mapping[Setting, tuple[float, float]]) -> list[list[Setting]]:
    """``points`` (setting: ``(mac_ratio, mean_kl)``) in successive non-dominated fronts: the
    first is what nothing beats, the next what only the first beats, and so on."""
    left, ranked = dict(points), []
    while left:
        front = [setting for setting, point in left.items()
                 if not any(_beats(other, point) for other in left.values())]
        ranked.append(front)
        for setting in front:
            del left[setting]
    return ranked


def survivors(points: Mapping[Setting, tuple[float, float]], share: float = SURVIVING_SHARE) -> list[Setting]:
    """The settings that go on: whole fronts of ``points``, best first, until at least ``share``
    of them are in (in front order, so a search cut short by its budget has the best)."""
    wanted, kept = math.ceil(share * len(points)), []
    for front in fronts(points):
        if len(kept) >= wanted:
            break
        kept.extend(front)
    return kept

