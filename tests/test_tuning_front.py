"""The front is exactly the non-dominated set of what was measured; the choice follows the
target; agreement and KL mean what they say; calibration and held-out images never overlap."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from evit_patch.tuning.front import Measured, UnreachableTarget, choose, pareto_front
from evit_patch.tuning.quality import agreement, calibration_split, mean_kl, top1

points = st.lists(st.builds(Measured, st.integers(0, 10**6), st.sampled_from([1.0, 1.2, 1.3, 1.5, 2.0]),
                            st.sampled_from([0.8, 0.9, 0.95, 1.0])), min_size=1, max_size=25)


@given(points)
def test_the_front_is_exactly_the_non_dominated_set(measured):
    front = pareto_front(measured)
    for point in measured:  # brute force, independently of the code under test
        beaten = any(o.speedup >= point.speedup and o.agreement >= point.agreement
                     and (o.speedup, o.agreement) != (point.speedup, point.agreement) for o in measured)
        assert (point in front) == (not beaten)
    assert [p.speedup for p in front] == sorted((p.speedup for p in front), reverse=True)
    assert [p.agreement for p in front] == sorted(p.agreement for p in front)  # slower is more agreeing


@given(points, st.sampled_from([1.0, 1.25, 1.5, 1.9]))
def test_a_speed_target_gets_the_most_agreeing_setting_that_fast(measured, target):
    front = pareto_front(measured)
    fast_enough = [p for p in measured if p.speedup >= target]
    if not fast_enough:
        with pytest.raises(UnreachableTarget, match=f"fastest found runs {max(p.speedup for p in measured):.2f}x"):
            choose(front, min_speedup=target)
        return
    chosen = choose(front, min_speedup=target)
    assert chosen.speedup >= target and chosen.agreement == max(p.agreement for p in fast_enough)


@given(points, st.sampled_from([0.0, 0.05, 0.1, 0.15]))
def test_a_loss_budget_gets_the_fastest_setting_within_it(measured, loss):
    within = [p for p in measured if 1 - p.agreement <= loss]
    if not within:
        with pytest.raises(UnreachableTarget, match="agreement lost"):
            choose(pareto_front(measured), max_agreement_loss=loss)
        return
    assert choose(pareto_front(measured), max_agreement_loss=loss).speedup == max(p.speedup for p in within)


def test_agreement_is_top1_against_the_unpatched_predictions_and_kl_is_zero_on_itself():
    generator = torch.Generator().manual_seed(0)
    reference, logits = torch.randn(2, 64, 10, generator=generator)
    assert agreement(reference, logits) == top1(logits, reference.argmax(dim=1))
    assert agreement(reference, reference) == 1.0 and mean_kl(reference, reference) == 0.0
    by_hand = sum(float((r.softmax(0) * (r.log_softmax(0) - p.log_softmax(0))).sum()) for r, p in
                  zip(reference.double(), logits.double())) / 64
    assert mean_kl(reference, logits) == pytest.approx(by_hand, rel=1e-12) and by_hand > 0


@given(st.integers(2, 500), st.data())
def test_calibration_and_held_out_images_never_overlap(count, data):
    calibration = data.draw(st.integers(1, count - 1))
    chosen, held_out = calibration_split(count, calibration, seed=data.draw(st.integers(0, 9)))
    assert len(chosen) == calibration and len(held_out) == count - calibration
    assert set(chosen.tolist()).isdisjoint(held_out.tolist())
    assert sorted(chosen.tolist() + held_out.tolist()) == list(range(count))
