"""keep_rate_for_budget / keep_rate_for_resolution against count_macs."""

import pytest
import timm

import evit_patch
from evit_patch.cost import keep_rate_for_budget, keep_rate_for_resolution

LAYERS = [1, 2, 3]


@pytest.fixture(scope="module")
def model():
    return timm.create_model("deit_tiny_patch16_224", img_size=96, depth=5, embed_dim=96, num_heads=3)


def macs_at(model, rate, img_size=None):
    patched = evit_patch.apply_evit(timm.create_model(
        "deit_tiny_patch16_224", img_size=img_size or 96, depth=5, embed_dim=96, num_heads=3), LAYERS, rate)
    return evit_patch.count_macs(patched)


def test_budget_rate_is_affordable_and_the_next_step_is_not(model) -> None:
    full = evit_patch.count_macs(model)
    target = 0.7 * full
    rate = keep_rate_for_budget(model, target, LAYERS)
    assert macs_at(model, rate) <= target
    assert macs_at(model, min(1.0, rate + 2e-3)) > target  # the boundary is exact, not a safe guess
    assert not evit_patch.is_patched(model)


def test_budget_rates_grow_with_the_budget(model) -> None:
    full = evit_patch.count_macs(model)
    rates = [keep_rate_for_budget(model, fraction * full, LAYERS) for fraction in (0.55, 0.7, 0.85, 1.0)]
    assert rates == sorted(rates) and rates[-1] == 1.0 and rates[0] < rates[1]


def test_unreachable_budgets_fail_clearly(model) -> None:
    with pytest.raises(ValueError, match="no keep rate reaches"):
        keep_rate_for_budget(model, 0.2 * evit_patch.count_macs(model), LAYERS)
    with pytest.raises(ValueError, match="positive"):
        keep_rate_for_budget(model, 0, LAYERS)


def test_resolution_rate_costs_no_more_than_the_native_model(model) -> None:
    native = evit_patch.count_macs(model)
    rate = keep_rate_for_resolution(model, 128, LAYERS)
    assert 0 < rate < 1
    assert macs_at(model, rate, 128) <= native < macs_at(model, min(1.0, rate + 2e-3), 128)
    assert keep_rate_for_resolution(model, 112, LAYERS) > rate  # a smaller step up keeps more
    assert tuple(model.patch_embed.img_size) == (96, 96)
