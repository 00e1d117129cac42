"""How many image tokens a layer keeps: exactly the official EViT count, the ceiling of
the float product ``keep_rate * n`` (no rounding of the product, no floor), at least one.

The expected count is computed here by exact rational arithmetic on the float product,
so neither ``math.ceil`` nor the product code is trusted to check itself.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_evit import kept_count

import evit_patch
from evit_patch.core.reduction import LayerContext
from evit_patch.reducers import EvitReducer, RandomDrop, ToMeMerge, kept_token_count, merged_token_count

rates = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_subnormal=True)
token_counts = st.integers(1, 4096)


def official_count(num_tokens: int, keep_rate: float) -> int:
    """The least integer not below the float product, capped at ``num_tokens``."""
    product = Fraction(keep_rate * num_tokens)  # exactly the float the official code rounds up
    return min(num_tokens, -(-product.numerator // product.denominator))


@given(token_counts, rates)
def test_count_is_the_ceiling_of_the_float_product(num_tokens: int, keep_rate: float) -> None:
    count = kept_token_count(num_tokens, keep_rate)
    assert count == official_count(num_tokens, keep_rate)
    assert 1 <= count <= num_tokens
    assert kept_count(num_tokens, keep_rate) == count  # the eager reference counts alike


@given(token_counts, st.data(), st.floats(min_value=1e-16, max_value=1e-6))
def test_count_just_above_a_whole_product_rounds_up(num_tokens: int, data: st.DataObject, nudge: float) -> None:
    """Rates a hair above k/n: the float product lies just above k and the official code
    keeps k + 1; rounding the product (to 6 decimals, say) would keep k."""
    whole = data.draw(st.integers(1, num_tokens))
    keep_rate = whole / num_tokens * (1 + nudge)
    if keep_rate <= 1.0:
        assert kept_token_count(num_tokens, keep_rate) == official_count(num_tokens, keep_rate)


@pytest.mark.parametrize(("num_tokens", "keep_rate", "count"), [
    (10, 0.50000001, 6),  # 5.0000001: one more than half, as officially
    (100, 0.7, 70),  # 0.7 * 100 is exactly 70.0 in floats
    (196, 0.7, 138),  # DeiT-S first layer
    (10, 0.55, 6),  # 5.5: the ceiling, not the floor
    (180, 0.55, 100),  # 99.00000000000001
    (200, 0.55, 111),  # 110.00000000000001
    (196, 1e-9, 1),  # a positive rate keeps a token
    (1, 5e-324, 1),  # even the smallest float
    (7, 1.0, 7),
])
def test_count_at_known_points(num_tokens: int, keep_rate: float, count: int) -> None:
    assert kept_token_count(num_tokens, keep_rate) == count
    assert kept_count(num_tokens, keep_rate) == count


def small_deit(img_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=img_size, depth=3, embed_dim=48, num_heads=3).eval()


def test_high_resolution_counts_follow_the_official_code() -> None:
    """288 px (324 patches) at keep 0.55: 324 -> 179 (+1) -> 100 (+1) -> 56; rounding the
    product to 6 decimals would keep 99 and then 55."""
    model = evit_patch.apply_evit(small_deit(288), [0, 1, 2], 0.55)
    with torch.no_grad():
        model(torch.randn(1, 3, 288, 288))
    assert [layer.kept_index.shape[1] for layer in evit_patch.kept_tokens(model)] == [179, 100, 56]


def test_a_tiny_keep_rate_keeps_one_token_and_the_fused_one() -> None:
    model = evit_patch.apply_evit(small_deit(64), [1, 2], 1e-9)
    lengths = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
        assert lengths == [17, 3, 3]  # class + 16 patches, then class + 1 kept + 1 fused (fused again)
        evit_patch.set_keep_rate(model, 5e-324)
        model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(logits).all()
    assert [layer.kept_index.shape[1] for layer in evit_patch.kept_tokens(model)] == [1, 1]


@pytest.mark.parametrize("keep_rate", [0.0, -0.5, 1.0000001, float("nan"), float("inf")])
def test_rates_outside_zero_to_one_are_refused(keep_rate: float) -> None:
    model = small_deit(64)
    with pytest.raises(ValueError, match=r"keep_rate must be in \(0, 1\]"):
        evit_patch.apply_evit(model, [1], keep_rate)
    evit_patch.apply_evit(model, [1], 0.5)
    with pytest.raises(ValueError, match=r"keep_rate must be in \(0, 1\]"):
        evit_patch.set_keep_rate(model, keep_rate)


@given(token_counts, rates)
def test_merging_leaves_as_many_tokens_as_evit(num_tokens: int, keep_rate: float) -> None:
    assert merged_token_count(num_tokens, keep_rate) == min(num_tokens, official_count(num_tokens, keep_rate) + 1)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 300), rates)
def test_every_reducer_shortens_to_the_official_count(num_tokens: int, keep_rate: float) -> None:
    """EViT (with and without fusion), random drop and merging, called as a layer would."""
    generator = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(2, 1 + num_tokens, 8, generator=generator)
    keys = torch.randn(2, 2, 1 + num_tokens, 4, generator=generator)
    attention = torch.rand(2, 2, 1 + num_tokens, 1 + num_tokens, generator=generator).softmax(-1)
    context = LayerContext(0, 0, keep_rate, 1, "class", False)
    keep = official_count(num_tokens, keep_rate)
    whole = keep == num_tokens
    assert EvitReducer(True).reduce(x, (None, None, None, attention), context).tokens.shape[1] == \
        1 + keep + (0 if whole else 1)
    assert EvitReducer(False).reduce(x, (None, None, None, attention), context).tokens.shape[1] == 1 + keep
    assert RandomDrop().reduce(x, (None, None, None, attention), context).tokens.shape[1] == 1 + keep
    if num_tokens - (keep + 1) <= math.ceil(num_tokens / 2):  # bipartite matching merges at most half
        assert ToMeMerge().reduce(x, (keys, keys, None, None), context).tokens.shape[1] == \
            1 + min(num_tokens, keep + 1)


@pytest.mark.parametrize("tokens, ratio, expected", [(196, 0.7, [137, 96, 67]), (100, 0.7, [70, 48, 34]),
                                                     (10, 0.1, [1, 1, 1])])
def test_dynamicvit_keeps_the_official_int_of_the_float_product(tokens, ratio, expected) -> None:
    """DynamicViT's stage counts are ``int(N * rho**s)`` of floats (0.7**2 * 100 is
    48.99999999999999: 48 kept), and never fewer than one token."""
    from evit_patch.dynamicvit.state import DynamicViTState

    state = DynamicViTState([1, 2, 3], ratio, 1, None, {}, {}, None, None)
    assert [state.kept_count(tokens, stage) for stage in range(3)] == expected
