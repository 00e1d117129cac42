"""The first look: whole non-dominated fronts of (MAC ratio, mean KL) go on, best first, until a
share of the candidates is in; whatever is screened out is beaten on both by one that goes on."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from evit_patch.tuning.screen import SCREEN_IMAGES, screening_size, survivors

looks = st.dictionaries(st.integers(0, 10**6), st.tuples(st.sampled_from([1.0, 1.2, 1.5, 1.8, 2.4]),
                                                         st.sampled_from([0.0, 0.01, 0.02, 0.05, 0.2])),
                        min_size=1, max_size=30)


def rank(points: dict) -> dict:
    """Each setting's front number, by brute force: 0 if nothing beats it, else one more than
    the highest rank of those that beat it (computed in order of how many beat them)."""
    def beats(a, b) -> bool:
        return a[0] >= b[0] and a[1] <= b[1] and a != b
    found: dict = {}
    for name in sorted(points, key=lambda n: sum(beats(points[o], points[n]) for o in points)):
        beaters = [o for o in points if beats(points[o], points[name])]
        found[name] = 0 if not beaters else 1 + max(found[o] for o in beaters)
    return found


@given(looks, st.sampled_from([0.1, 1 / 3, 0.5, 1.0]))
def test_whole_fronts_go_on_best_first_until_the_share_is_in(points, share):
    kept = survivors(points, share)
    ranks = rank(points)
    assert len(set(kept)) == len(kept) and set(kept) <= set(points)
    assert len(kept) >= math.ceil(share * len(points))
    deepest = max(ranks[name] for name in kept)
    assert set(kept) == {name for name in points if ranks[name] <= deepest}  # whole fronts, nothing skipped
    assert len([name for name in points if ranks[name] < deepest]) < math.ceil(share * len(points))  # no front too many
    assert [ranks[name] for name in kept] == sorted(ranks[name] for name in kept)  # best first
    for name in set(points) - set(kept):  # every one screened out is beaten on both by one that goes on
        assert any(points[o][0] >= points[name][0] and points[o][1] <= points[name][1] and points[o] != points[name]
                   for o in kept)


def test_the_first_look_takes_a_quarter_of_a_large_calibration_split_and_all_of_a_small_one():
    assert screening_size(4 * SCREEN_IMAGES - 1) == 4 * SCREEN_IMAGES - 1
    assert screening_size(4 * SCREEN_IMAGES) == SCREEN_IMAGES
    assert screening_size(1000) == 250
