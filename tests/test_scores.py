"""Scores computed beside fused attention equal those of the explicit attention matrix."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from evit_patch.core.scores import scores_from_attention, scores_from_qk


@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 30), st.integers(0, 3), st.integers(0, 999),
       st.sampled_from(["class", "mean"]))
def test_scores_from_qk_match_explicit_attention(batch, heads, tokens, prefix, seed, mode):
    prefix = min(prefix, tokens - 1)
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, tokens, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    attention = (q @ k.transpose(-2, -1) / 8**0.5).softmax(-1)
    expected = attention[:, :, 0, prefix:].mean(1) if mode == "class" else attention.mean((1, 2))[:, prefix:]
    torch.testing.assert_close(scores_from_qk(q, k, None, mode, prefix), expected)
    torch.testing.assert_close(scores_from_attention(attention, mode, prefix), expected)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 30), st.integers(0, 999), st.sampled_from(["class", "mean"]),
       st.sampled_from([torch.float32, torch.bfloat16]))
def test_scores_from_views_into_a_packed_projection(batch, heads, tokens, seed, mode, dtype):
    """q and k as timm hands them over: strided views into one ``(B, N, 3, H, d)`` qkv
    output, in the activations' dtype; scores equal those of dense float64 copies."""
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3, heads, 8, generator=generator).to(dtype).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    attention = (q.double() @ k.double().transpose(-2, -1) / 8**0.5).softmax(-1)
    expected = attention[:, :, 0, 1:].mean(1) if mode == "class" else attention.mean((1, 2))[:, 1:]
    scores = scores_from_qk(q, k, None, mode, 1)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["class", "mean"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_scores_are_finite_and_float32(dtype, mode):
    """Selection and fusion weights never take the activations' low precision."""
    q = torch.randn(2, 3, 50, 16).mul(30).to(dtype)
    scores = scores_from_qk(q, q, None, mode, 1)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    attention = (q.float() @ q.float().transpose(-2, -1) / 4).softmax(-1).to(dtype)
    assert scores_from_attention(attention, mode, 1).dtype == torch.float32
