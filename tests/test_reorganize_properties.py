"""Invariants of the EViT reorganization on random tensors (hypothesis)."""

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference_evit import kept_count

from evit_patch.reducers.evit import reorganize_tokens

keep_rates = st.floats(min_value=0.01, max_value=1.0, allow_nan=False).map(lambda r: round(r, 2)).filter(lambda r: r > 0)
settings.register_profile("evit", max_examples=60, deadline=None)
settings.load_profile("evit")


@st.composite
def token_batches(draw, dtype=torch.float64):
    """Tokens (B, P + n, C) and distinct positive scores (B, n) that sum to at most 1."""
    batch = draw(st.integers(1, 3))
    prefix = draw(st.integers(0, 5))
    num_image = draw(st.integers(1, 40))
    channels = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, prefix + num_image, channels, generator=generator, dtype=dtype)
    logits = torch.randn(batch, prefix + num_image, generator=generator, dtype=torch.float64) * draw(
        st.sampled_from([0.0, 1.0, 30.0])  # flat, ordinary, peaked
    )
    scores = logits.softmax(-1)[:, prefix:] * draw(st.sampled_from([1.0, 1e-30]))  # tiny scores too
    return x, scores.to(dtype), prefix


@given(token_batches(), st.booleans())
def test_keep_rate_one_is_identity(batch, fuse):
    x, scores, prefix = batch
    out, kept = reorganize_tokens(x, scores, prefix, 1.0, fuse)
    assert torch.equal(out, x)
    assert torch.equal(kept[0], torch.arange(x.shape[1] - prefix))


@given(token_batches(), keep_rates, st.booleans(), st.integers(1, 4))
def test_token_counts_follow_the_formula_at_every_layer(batch, rate, fuse, layers):
    x, _, prefix = batch
    generator = torch.Generator().manual_seed(layers)
    for _ in range(layers):
        n = x.shape[1] - prefix
        scores = torch.rand(x.shape[0], n, generator=generator, dtype=x.dtype)
        x, _ = reorganize_tokens(x, scores, prefix, rate, fuse)
        keep = kept_count(n, rate)
        assert x.shape[1] == prefix + keep + (1 if fuse and keep < n else 0)


@given(token_batches(), keep_rates)
def test_kept_tokens_are_the_top_scores_and_fused_is_the_weighted_rest(batch, rate):
    x, scores, prefix = batch
    out, kept_index = reorganize_tokens(x, scores, prefix, rate, fuse=True)
    n = x.shape[1] - prefix
    keep = kept_count(n, rate)
    for b in range(x.shape[0]):
        ranked = sorted(range(n), key=lambda i: -float(scores[b, i]))
        threshold = float(scores[b, ranked[keep - 1]])
        kept = kept_index[b].tolist()
        assert len(set(kept)) == keep
        assert all(float(scores[b, i]) >= threshold for i in kept)
        assert all(float(scores[b, i]) <= threshold for i in set(range(n)) - set(kept))
        torch.testing.assert_close(out[b, prefix:prefix + keep], x[b, prefix:][kept])
        if keep < n:
            unkept = sorted(set(range(n)) - set(kept))
            expected = sum(scores[b, i] * x[b, prefix + i] for i in unkept)
            torch.testing.assert_close(out[b, -1], expected, rtol=1e-12, atol=1e-300)


@given(token_batches(), keep_rates, st.booleans())
def test_prefix_tokens_pass_unchanged(batch, rate, fuse):
    x, scores, prefix = batch
    out, _ = reorganize_tokens(x, scores, prefix, rate, fuse)
    assert torch.equal(out[:, :prefix], x[:, :prefix])


@given(token_batches(), keep_rates, st.booleans())
def test_samples_are_independent(batch, rate, fuse):
    x, scores, prefix = batch
    out, _ = reorganize_tokens(x, scores, prefix, rate, fuse)
    for b in range(x.shape[0]):
        alone, _ = reorganize_tokens(x[b:b + 1], scores[b:b + 1], prefix, rate, fuse)
        torch.testing.assert_close(out[b:b + 1], alone, rtol=1e-12, atol=0)


@given(token_batches(), keep_rates, st.booleans(), st.integers(0, 2**16))
def test_permuting_image_tokens_changes_no_output_set(batch, rate, fuse, seed):
    x, scores, prefix = batch
    n = x.shape[1] - prefix
    assume(all(len(set(row.tolist())) == n for row in scores))  # ties make the kept set ambiguous
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    shuffled = torch.cat([x[:, :prefix], x[:, prefix:][:, permutation]], dim=1)
    out, _ = reorganize_tokens(x, scores, prefix, rate, fuse)
    out_shuffled, _ = reorganize_tokens(shuffled, scores[:, permutation], prefix, rate, fuse)
    if kept_count(n, rate) == n:  # nothing reorganized: the same tokens, in the given order
        out_shuffled = torch.cat([out_shuffled[:, :prefix], out_shuffled[:, prefix:][:, permutation.argsort()]], dim=1)
    # kept tokens come highest score first, so the order is set by the scores alone
    torch.testing.assert_close(out_shuffled, out, rtol=1e-9, atol=1e-12 * float(out.abs().max()))


@given(token_batches(dtype=torch.float32), keep_rates, st.booleans(),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_dtype_is_kept_and_values_stay_finite(batch, rate, fuse, dtype):
    x, scores, prefix = batch
    out, _ = reorganize_tokens(x.to(dtype), scores.to(dtype), prefix, rate, fuse)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert math.isfinite(float(out.float().abs().sum()))
