"""Key-weighted attention against an eager reference, fused and explicit, on timm Attention."""

import copy

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.layers import Attention

from evit_patch.core.key_weighting import KeyWeights, weighted_key_attention
from evit_patch.core.scored_attention import scored_attention


def timm_attention(fused: bool, attn_drop: float = 0.0, qk_norm: bool = False) -> Attention:
    torch.manual_seed(0)
    attention = Attention(24, num_heads=3, qkv_bias=True, qk_norm=qk_norm, attn_drop=attn_drop,
                          norm_layer=torch.nn.LayerNorm)
    attention.fused_attn = fused
    return attention.double().eval()


def eager_weighted_attention(attention: Attention, x: torch.Tensor, weights: torch.Tensor,
                             self_loop: bool) -> torch.Tensor:
    """The definition, written out: p_ij = exp(l_ij) w_ij / sum_k exp(l_ik) w_ik, with
    w_ii = 1 under a self-loop; then timm's own projections around it."""
    batch, tokens, width = x.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    q, k, v = attention.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = attention.q_norm(q), attention.k_norm(k)
    logits = q @ k.transpose(-2, -1) / head_dim ** 0.5
    pair_weights = weights[:, None, None, :].expand(batch, 1, tokens, tokens).clone()
    if self_loop:
        pair_weights[..., range(tokens), range(tokens)] = 1.0
    numerators = logits.exp() * pair_weights
    probabilities = numerators / numerators.sum(dim=-1, keepdim=True)
    out = (probabilities @ v).transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    return attention.proj(attention.norm(out))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("attn_drop", [0.0, 0.3])
def test_without_weights_the_output_is_the_original_bit_for_bit(fused, attn_drop) -> None:
    attention = timm_attention(fused, attn_drop, qk_norm=True)
    weighted = weighted_key_attention(attention, KeyWeights(self_loop=True), "test")
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    for mode in ("train", "eval"):
        getattr(attention, mode)(), getattr(weighted, mode)()
        torch.manual_seed(1)
        expected = attention(x)
        torch.manual_seed(1)
        assert torch.equal(weighted(x), expected)
        torch.manual_seed(1)
        assert torch.equal(weighted(x, attn_mask=None, is_causal=False), expected)  # as timm's Block calls it
    if attn_drop:  # the rewrite kept dropout live, not frozen at trace time
        weighted.train()
        assert not torch.equal(weighted(x), weighted.eval()(x))


@settings(max_examples=25, deadline=None)
@given(fused=st.booleans(), self_loop=st.booleans(), batch=st.integers(1, 3), tokens=st.integers(2, 9),
       seed=st.integers(0, 2**16), zero_fraction=st.sampled_from([0.0, 0.3, 0.7]))
def test_weighted_attention_matches_the_eager_definition(fused, self_loop, batch, tokens, seed, zero_fraction) -> None:
    attention = timm_attention(fused, qk_norm=True)
    holder = KeyWeights(self_loop=self_loop, eps=0.0)
    weighted = weighted_key_attention(attention, holder, "test")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, 24, generator=generator, dtype=torch.float64)
    weights = torch.rand(batch, tokens, generator=generator, dtype=torch.float64) * 3
    weights[torch.rand(batch, tokens, generator=generator) < zero_fraction] = 0.0
    weights[:, 0] = 1.0  # at least one key weighted in every row
    weights.requires_grad_(True)
    holder.weights = weights
    output = weighted(x)
    (gradient,) = torch.autograd.grad(output.square().sum(), weights)
    reference_weights = weights.detach().clone().requires_grad_(True)
    expected = eager_weighted_attention(attention, x, reference_weights, self_loop)
    (expected_gradient,) = torch.autograd.grad(expected.square().sum(), reference_weights)
    torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-8, atol=1e-10)
    assert gradient.abs().sum() > 0


def test_unit_weights_give_plain_attention_and_sizes_give_proportional_attention() -> None:
    """All-ones weights change nothing; weights s_j equal adding log(s_j) to the logits,
    i.e. attention to a merged token as if its s_j members were all there."""
    attention = timm_attention(fused=True)
    holder = KeyWeights(self_loop=False, eps=0.0)
    weighted = weighted_key_attention(attention, holder, "test")
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    holder.weights = torch.ones(2, 5, dtype=torch.float64)
    torch.testing.assert_close(weighted(x), attention(x), rtol=1e-12, atol=1e-12)
    # token 4 standing for two identical tokens: duplicate it and compare the other rows
    holder.weights = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0]] * 2, dtype=torch.float64)
    duplicated = torch.cat([x, x[:, 4:]], dim=1)
    torch.testing.assert_close(weighted(x)[:, :4], attention(duplicated)[:, :4], rtol=1e-10, atol=1e-10)


def test_zero_weighted_keys_get_exactly_zero_attention_and_rows_sum_to_one() -> None:
    attention = timm_attention(fused=False)
    holder = KeyWeights(self_loop=True)
    weighted = weighted_key_attention(attention, holder, "test")
    seen = []
    attention.attn_drop.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    holder.weights = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    weighted(torch.randn(1, 6, 24, dtype=torch.float64))
    probabilities = seen[-1][0]  # (heads, queries, keys)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(3, 6, dtype=torch.float64), rtol=0, atol=1e-5)
    for dropped in (1, 3):
        others = [query for query in range(6) if query != dropped]
        assert torch.all(probabilities[:, others, dropped] == 0)
        assert torch.all(probabilities[:, dropped, dropped] > 0)  # the self-loop


def test_rewrite_of_the_scored_attention_keeps_its_output_structure() -> None:
    for fused in (True, False):
        attention = timm_attention(fused)
        scored = scored_attention(attention, "test")
        holder = KeyWeights(self_loop=True, eps=0.0)
        weighted = weighted_key_attention(scored, holder, "test")
        x = torch.randn(2, 6, 24, dtype=torch.float64)
        expected_output, expected_tensors = scored(x)
        output, tensors = weighted(x)
        assert torch.equal(output, expected_output)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(tensors, expected_tensors))
        holder.weights = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 1.0]] * 2, dtype=torch.float64)
        output, tensors = weighted(x)
        torch.testing.assert_close(output, eager_weighted_attention(attention, x, holder.weights, True),
                                   rtol=1e-10, atol=1e-10)
        assert len(tensors) == len(expected_tensors) == (5 if fused else 4)  # fused: its attn_mask last


def test_state_dict_keys_stay_and_the_holder_adds_none() -> None:
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=2)
    keys = list(model.state_dict())
    holder = KeyWeights(self_loop=True)
    for block in model.blocks:
        block.attn = weighted_key_attention(block.attn, holder, "deit")
    assert list(model.state_dict()) == keys
    assert sum(1 for _ in holder.parameters()) == 0


def test_bad_weights_and_masks_are_refused_clearly() -> None:
    attention = timm_attention(fused=True)
    holder = KeyWeights(self_loop=True)
    weighted = weighted_key_attention(attention, holder, "test")
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    holder.weights = torch.ones(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape \(2, 5\).*batch of 2 with 6 keys"):
        weighted(x)
    holder.weights = None
    with pytest.raises(ValueError, match="traced with attn_mask=None and cannot take another attn_mask"):
        weighted(x, attn_mask=torch.zeros(6, 6, dtype=torch.bool))


def test_deep_copy_gives_a_holder_without_weights() -> None:
    attention = timm_attention(fused=True)
    holder = KeyWeights(self_loop=True)
    weighted = weighted_key_attention(attention, holder, "test")
    holder.weights = torch.ones(1, 4, requires_grad=True) * 2  # inside an autograd graph
    clone = copy.deepcopy(weighted)
    assert clone.key_weights is not holder and clone.key_weights.weights is None
    assert clone.key_weights.self_loop
