"""Invariants of the baseline reducers: random drop, ToMe-style merging, oracle guidance."""

import copy

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_evit import _attention, _layer_norm, _layer_scale, kept_count

from evit_patch import DROPPED, FUSED, KEPT, apply_token_reducer, kept_tokens
from evit_patch.reducers import EvitReducer, LayerContext, RandomDrop, ToMeMerge, bipartite_merge
from evit_patch.reducers.oracle import OracleGuided

settings.register_profile("reducers", max_examples=60, deadline=None)
settings.load_profile("reducers")


@st.composite
def layer_inputs(draw):
    """Tokens (B, P + n, C), fused-attention tensors for them, and a layer context."""
    batch, prefix, num_image = draw(st.integers(1, 3)), draw(st.integers(0, 4)), draw(st.integers(2, 40))
    channels, heads = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    rate = draw(st.sampled_from([0.5, 0.55, 0.7, 0.9, 0.99, 1.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    total = prefix + num_image
    x = torch.randn(batch, total, channels, generator=generator, dtype=torch.float64)
    q, k = torch.randn(2, batch, heads, total, 4, generator=generator, dtype=torch.float64)
    context = LayerContext(0, 0, rate, prefix, "class", True)
    return x, (q, k, None, None), context


@given(layer_inputs(), st.integers(0, 1000))
def test_random_drop_keeps_prefix_and_exactly_the_evit_count_of_distinct_tokens(inputs, seed):
    x, attention, context = inputs
    num_image = x.shape[1] - context.num_prefix_tokens
    reduction = RandomDrop(seed).reduce(x, attention, context)
    keep = kept_count(num_image, context.keep_rate)
    assert reduction.tokens.shape[1] == context.num_prefix_tokens + keep
    assert torch.equal(reduction.tokens[:, :context.num_prefix_tokens], x[:, :context.num_prefix_tokens])
    for sample in range(x.shape[0]):
        assert len(set(reduction.kept_index[sample].tolist())) == keep
        expected = x[sample, context.num_prefix_tokens:][reduction.kept_index[sample]]
        assert torch.equal(reduction.tokens[sample, context.num_prefix_tokens:], expected)


@given(layer_inputs(), st.integers(0, 1000))
def test_random_drop_is_seeded_and_reproducible(inputs, seed):
    x, attention, context = inputs
    first, second = RandomDrop(seed), RandomDrop(seed)
    for _ in range(3):  # the same sequence of draws, forward after forward
        assert torch.equal(first.reduce(x, attention, context).kept_index,
                           second.reduce(x, attention, context).kept_index)


def test_random_drop_draws_differ_by_seed_and_by_forward():
    x = torch.randn(2, 1 + 100, 8)
    context = LayerContext(0, 0, 0.5, 1, "class", True)
    reducer = RandomDrop(0)
    first, again = (reducer.reduce(x, (None,) * 4, context).kept_index for _ in range(2))
    other_seed = RandomDrop(1).reduce(x, (None,) * 4, context).kept_index
    assert not torch.equal(first, again) and not torch.equal(first, other_seed)


@given(layer_inputs())
def test_tome_keeps_prefix_and_leaves_the_evit_count_plus_one(inputs):
    x, attention, context = inputs
    num_image = x.shape[1] - context.num_prefix_tokens
    reducer = ToMeMerge()
    reduction = reducer.reduce(x, attention, context)
    assert reduction.tokens.shape[1] == context.num_prefix_tokens + min(num_image, kept_count(num_image, context.keep_rate) + 1)
    assert torch.equal(reduction.tokens[:, :context.num_prefix_tokens], x[:, :context.num_prefix_tokens])


@st.composite
def merge_inputs(draw):
    batch, count, channels = draw(st.integers(1, 3)), draw(st.integers(2, 30)), draw(st.integers(1, 5))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(batch, count, channels, generator=generator, dtype=torch.float64)
    metric = torch.randn(batch, count, 3, generator=generator, dtype=torch.float64)
    sizes = torch.randint(1, 5, (batch, count), generator=generator).double()
    merged = draw(st.integers(0, (count + 1) // 2))
    return x, metric, sizes, merged


@given(merge_inputs())
def test_merging_conserves_size_weighted_sums_and_sizes(inputs):
    x, metric, sizes, merged = inputs
    out, out_sizes, reduction = bipartite_merge(x, metric, sizes, merged)
    assert out.shape[1] == x.shape[1] - merged
    torch.testing.assert_close((out * out_sizes.unsqueeze(-1)).sum(1), (x * sizes.unsqueeze(-1)).sum(1))
    torch.testing.assert_close(out_sizes.sum(1), sizes.sum(1))


@given(merge_inputs())
def test_each_merged_token_is_the_size_weighted_mean_of_the_tokens_sent_to_it(inputs):
    x, metric, sizes, merged = inputs
    out, out_sizes, reduction = bipartite_merge(x, metric, sizes, merged)
    for sample in range(x.shape[0]):
        for token in range(out.shape[1]):
            members = (reduction.destination[sample] == token).nonzero().flatten()
            weights = sizes[sample, members]
            assert len(members) >= 1 and bool(reduction.mixed[sample, token]) == (len(members) > 1)
            torch.testing.assert_close(out_sizes[sample, token], weights.sum())
            torch.testing.assert_close(out[sample, token], (x[sample, members] * weights[:, None]).sum(0) / weights.sum())


def test_merging_picks_the_most_similar_pairs():
    """Two A tokens with exact twins in B are the ones merged when one merge of two is asked for."""
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [-1.0, 0.2]]])  # A = 0, 2; B = 1, 3
    x = torch.arange(4.0).reshape(1, 4, 1)
    out, sizes, reduction = bipartite_merge(x, metric, torch.ones(1, 4), 1)
    assert reduction.destination[0, 0] == reduction.destination[0, 1]  # token 0 merged into its twin 1
    assert torch.equal(sizes, torch.tensor([[1.0, 2.0, 1.0]]))


def test_merging_more_than_half_is_refused():
    with pytest.raises(ValueError, match="at most 3 of 6 tokens"):
        bipartite_merge(torch.randn(1, 6, 2), torch.randn(1, 6, 2), torch.ones(1, 6), 4)


@pytest.fixture(scope="module")
def deit_tiny():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=64).eval()


def test_tome_on_a_model_merges_every_patch_somewhere_and_tracks_sizes(deit_tiny):
    model = apply_token_reducer(copy.deepcopy(deit_tiny), [1, 3, 5], 0.7, ToMeMerge())
    images = torch.randn(2, 3, 64, 64)
    model(images)
    counts = [16]
    for layer in kept_tokens(model):
        counts.append(kept_count(counts[-1], 0.7) + 1)
        assert int(layer.token_of_patch.max()) + 1 == counts[-1]
        assert not (layer.status == DROPPED).any()
        held = torch.zeros(2, counts[-1]).scatter_add_(1, layer.token_of_patch, torch.ones(2, 16))
        assert torch.equal(layer.status == FUSED, held.gather(1, layer.token_of_patch) > 1)
    assert torch.equal(held, model.evit_state.reducer.sizes)  # sizes = patches each token holds


def _oracle_scores(oracle, images, block_index):
    """The oracle's class-attention row at ``block_index``, from an eager forward on every patch."""
    x = oracle.norm_pre(oracle._pos_embed(oracle.patch_embed(images)))
    for index, block in enumerate(oracle.blocks):
        out, attention = _attention(_layer_norm(x, block.norm1), block.attn)
        if index == block_index:
            return attention[:, :, 0, oracle.num_prefix_tokens:].mean(1)
        x = x + _layer_scale(out, block.ls1)
        x = x + _layer_scale(block.mlp(_layer_norm(x, block.norm2)), block.ls2)


@pytest.mark.parametrize("training", [True, False])
def test_oracle_selection_is_the_top_k_of_the_oracles_scores(deit_tiny, training):
    torch.manual_seed(1)
    oracle = timm.create_model("deit_tiny_patch16_224", img_size=64).eval()  # other weights than the student
    student = apply_token_reducer(copy.deepcopy(deit_tiny), [1, 3], 0.5, OracleGuided(oracle, [1, 3]))
    student.train(training)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    student.double(), oracle.double()
    student(images)
    first, second = kept_tokens(student)
    expected = _oracle_scores(oracle, images, 1)
    assert torch.equal(first.kept_index, expected.topk(8, dim=1).indices)
    # at the second layer a token is scored by the oracle's attention to the patches it holds
    later = _oracle_scores(oracle, images, 3)
    held = torch.zeros(2, 9, dtype=torch.float64).scatter_add_(1, first.token_of_patch, later)
    assert torch.equal(second.kept_index, held.topk(5, dim=1).indices)
    still_own_token = torch.stack([torch.isin(first.token_of_patch[b], second.kept_index[b]) for b in range(2)])
    assert torch.equal(second.status == KEPT, still_own_token & (first.status == KEPT))


def test_oracle_at_eval_can_give_way_to_the_students_own_attention(deit_tiny):
    torch.manual_seed(1)
    oracle = timm.create_model("deit_tiny_patch16_224", img_size=64).eval()
    guided = apply_token_reducer(copy.deepcopy(deit_tiny), [1], 0.5, OracleGuided(oracle, [1], at_eval=False))
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    own_weights = copy.deepcopy(deit_tiny).double()  # the shared fixture itself stays float32 whatever happens here
    guided.double(), oracle.double()
    guided.eval()(images)
    assert guided.evit_state.reducer.recorder.scores == {}  # the oracle did not even run
    own = _oracle_scores(own_weights, images, 1)
    assert torch.equal(kept_tokens(guided)[0].kept_index, own.topk(8, dim=1).indices)
    guided.train()(images)
    assert torch.equal(kept_tokens(guided)[0].kept_index, _oracle_scores(oracle, images, 1).topk(8, dim=1).indices)


def _oracle_guided_reference(student, oracle, images, layers, keep_rate):
    """Eager logits of EViT whose choices follow the oracle: each token the student holds is
    scored by the oracle's class attention to the patches inside it (a fused token by the
    sum over its patches); the top ``ceil(r n)`` stay in score order, the rest are fused
    with those raw scores as weights."""
    prefix = student.num_prefix_tokens
    x = student.norm_pre(student._pos_embed(student.patch_embed(images)))
    batch, num_patches = x.shape[0], x.shape[1] - prefix
    holders = [[[patch] for patch in range(num_patches)] for _ in range(batch)]  # patches inside each token
    for index, block in enumerate(student.blocks):
        out, _ = _attention(_layer_norm(x, block.norm1), block.attn)
        x = x + _layer_scale(out, block.ls1)
        if index in layers:
            patch_scores = _oracle_scores(oracle, images, index)
            samples = []
            for b in range(batch):
                scores = torch.stack([patch_scores[b, held].sum() for held in holders[b]])
                keep = kept_count(len(holders[b]), keep_rate)
                order = sorted(range(len(holders[b])), key=lambda t: -float(scores[t]))
                kept, rest = order[:keep], order[keep:]
                fused = sum(scores[t] * x[b, prefix + t] for t in rest)
                samples.append(torch.cat([x[b, :prefix], x[b, prefix:][kept], fused.unsqueeze(0)]))
                holders[b] = [holders[b][t] for t in kept] + [[p for t in rest for p in holders[b][t]]]
            x = torch.stack(samples)
        x = x + _layer_scale(block.mlp(_layer_norm(x, block.norm2)), block.ls2)
    return student.forward_head(student.norm(x))


@pytest.mark.parametrize("training", [True, False])
def test_oracle_guided_logits_equal_an_eager_reference(deit_tiny, training):
    """Selection, order and fusion weights all follow the oracle (the kept indices alone
    would not show renormalized or student-scored fusion)."""
    torch.manual_seed(1)
    oracle = timm.create_model("deit_tiny_patch16_224", img_size=64).eval().double()
    student = copy.deepcopy(deit_tiny).double()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = _oracle_guided_reference(student, oracle, images, [1, 3], 0.5)
        own_attention = _oracle_guided_reference(student, student, images, [1, 3], 0.5)
        assert not torch.allclose(expected, own_attention, rtol=1e-6, atol=1e-6)  # the oracle changes the result
        apply_token_reducer(student, [1, 3], 0.5, OracleGuided(oracle, [1, 3]))
        actual = student.train(training)(images)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_tome_keeps_no_key_weights_between_forwards_and_removes_cleanly(deit_tiny):
    model = copy.deepcopy(deit_tiny)
    images = torch.randn(2, 3, 64, 64)
    reference = model(images)
    patched = apply_token_reducer(model, [1, 3], 0.7, ToMeMerge())
    first = patched(images[:1])
    second = patched(images[:1])  # a new forward starts without the last one's sizes
    assert torch.equal(first, second)
    from evit_patch import remove_evit

    remove_evit(patched)
    assert torch.equal(patched(images), reference)
    assert all(type(block.attn).__name__ == "Attention" for block in patched.blocks)


@pytest.mark.parametrize("make_reducer", [EvitReducer, lambda: RandomDrop(0), ToMeMerge,
                                          lambda: OracleGuided(timm.create_model("deit_tiny_patch16_224", img_size=64), [1, 3])],
                         ids=["evit", "random", "tome", "oracle"])
def test_a_model_copies_after_a_training_step(deit_tiny, make_reducer):
    """EMA and the spy in tests deep-copy the model between steps: nothing of a forward's
    autograd graph may stay in the patch's state."""
    model = apply_token_reducer(copy.deepcopy(deit_tiny).train(), [1, 3], 0.7, make_reducer())
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    twin = copy.deepcopy(model).eval()  # a tensor of the forward's graph in the state would refuse the copy
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(twin(images), model.eval()(images))  # random drop: the copy's generator is at the same draw


def test_a_dynamicvit_model_is_refused_and_left_as_it_was(deit_tiny):
    from evit_patch.dynamicvit import apply_dynamicvit, dynamicvit_state

    model = apply_dynamicvit(copy.deepcopy(deit_tiny), [1, 3], 0.7).eval()
    state = dynamicvit_state(model)
    images = torch.randn(1, 3, 64, 64)
    before = model(images)
    with pytest.raises(ValueError, match="already patched with DynamicViT; call remove_dynamicvit"):
        apply_token_reducer(model, [1], 0.7, ToMeMerge())
    assert torch.equal(model(images), before) and dynamicvit_state(model) is state
