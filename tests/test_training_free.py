"""Training-free EViT against the independent eager reference in tests/reference_training_free.py,
its pure mechanisms against loops written here, and its selection in one keyword.

The model is chosen so that each wrong variant changes the result: token norms differ
(so a sum that is not renormalized, or an unweighted mean, differs from the size-weighted
average), later layers absorb tokens of unequal sizes, and proportional attention
changes the logits. Each difference is asserted on the reference itself, so the
comparison cannot pass for want of one.
"""

import copy
from pathlib import Path
from unittest import mock

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_evit import reference_forward
from reference_tome import merge_sample
from reference_training_free import absorb_sample, kept_count, pooled_similarities, training_free_forward

import evit_patch
from evit_patch.reducers import TrainingFreeEvit, absorb_into_kept, pools_closer, training_free
from evit_patch.reducers.tome import bipartite_matching
from evit_patch.reducers.training_free import absorb_destinations
from evit_patch.train.methods import recipe_method, recipe_reducer
from evit_patch.train.recipe import RecipeError, load_recipe

LAYERS = [0, 2]
KEEP_RATE = 0.6  # 64 -> 40 -> 25 image tokens
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "fashion_mnist.yaml"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A 4-block float64 ViT on 32 px images in 4 px patches (64 image tokens) with a class
    token and two registers; keys scaled unevenly so that token norms differ. Pooling is
    closer for some samples and layers and absorbing for others (asserted below)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=4,
                              num_heads=3, reg_tokens=2).eval().double()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[48:96].mul_(torch.linspace(0.2, 3.0, 48, dtype=torch.float64)[:, None])
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _patched(model, pooling="always", proportional=True, layers=LAYERS, keep_rate=KEEP_RATE):
    reducer = TrainingFreeEvit(pooling=pooling, proportional_attention=proportional)
    return evit_patch.apply_token_reducer(copy.deepcopy(model), layers, keep_rate, reducer)


def _sizes_of(patched, images):
    """Each layer's token sizes, read after the layer during one forward."""
    reducer = patched.evit_state.reducer
    seen = []
    hooks = [patched.blocks[index].get_submodule(_reorganizer_name(patched.blocks[index])).register_forward_hook(
        lambda *_: seen.append(reducer.sizes.clone())) for index in LAYERS]
    with torch.no_grad():
        logits = patched(images)
    for hook in hooks:
        hook.remove()
    return logits, seen


def _reorganizer_name(block) -> str:
    return next(name for name, module in block.named_modules() if type(module).__name__ == "TokenReorganizer")


# -- the whole forward against the eager reference ---------------------------------------------------------


@pytest.mark.parametrize("pooling", ["never", "always", "closer"])
def test_forward_matches_the_eager_reference(model, images, pooling) -> None:
    maps = []
    expected, expected_sizes = training_free_forward(model, images, LAYERS, KEEP_RATE, pooling, maps=maps)
    patched = _patched(model, pooling)
    logits, sizes = _sizes_of(patched, images)
    torch.testing.assert_close(logits, expected, rtol=1e-7, atol=1e-7)
    for layer, layer_sizes in enumerate(expected_sizes):
        assert sizes[layer].tolist() == layer_sizes
    for record, layer_maps in zip(patched.evit_state.records, maps, strict=True):  # the map a dense head reads
        assert record.kept_index.tolist() == [kept for kept, _ in layer_maps]
        assert record.destination.tolist() == [destination for _, destination in layer_maps]


def _decisions(patched, images) -> list[torch.Tensor]:
    """Each layer's per-sample choice to pool, recorded during one forward."""
    decisions = []

    def recorded(*similarities):
        decisions.append(pools_closer(*similarities))
        return decisions[-1]

    with mock.patch.object(training_free, "pools_closer", recorded), torch.no_grad():
        patched(images)
    return decisions


def test_the_per_sample_choice_really_mixes_the_batch(model, images) -> None:
    """Some samples pool at a layer where others absorb, so the reference comparison
    above covers the mixed path."""
    decisions = _decisions(_patched(model, "closer"), images)
    assert len(decisions) == len(LAYERS)
    assert any(0 < int(pools.sum()) < len(pools) for pools in decisions)


def test_each_sample_is_reduced_as_if_alone(model, images) -> None:
    patched = _patched(model, "closer")
    with torch.no_grad():
        together = patched(images)
        alone = torch.cat([patched(images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(together, alone, rtol=1e-7, atol=1e-7)


def test_the_reference_tells_the_mechanisms_apart(model, images) -> None:
    """Proportional attention, pooling and absorbing each change the reference's logits."""
    base, _ = training_free_forward(model, images, LAYERS, KEEP_RATE, "never")
    for other in (training_free_forward(model, images, LAYERS, KEEP_RATE, "never", proportional=False)[0],
                  training_free_forward(model, images, LAYERS, KEEP_RATE, "always")[0],
                  training_free_forward(model, images, LAYERS, KEEP_RATE, "closer")[0]):
        assert (other - base).abs().max() > 1e-3
    assert (training_free_forward(model, images, LAYERS, KEEP_RATE, "always")[0]
            - training_free_forward(model, images, LAYERS, KEEP_RATE, "closer")[0]).abs().max() > 1e-3


def test_without_proportional_attention_matches_the_reference(model, images) -> None:
    expected, _ = training_free_forward(model, images, LAYERS, KEEP_RATE, "closer", proportional=False)
    with torch.no_grad():
        logits = _patched(model, "closer", proportional=False)(images)
    torch.testing.assert_close(logits, expected, rtol=1e-7, atol=1e-7)


# -- size bookkeeping --------------------------------------------------------------------------------------


def test_sizes_are_conserved_through_two_reorganization_layers(model, images) -> None:
    """Every patch is held by exactly one token after each layer, and the sizes say by how many."""
    patched = _patched(model)
    _, sizes = _sizes_of(patched, images)
    records = patched.evit_state.records
    held = torch.arange(64).expand(len(images), -1)  # the token holding each patch
    for layer, record in enumerate(records):
        held = record.destination.gather(1, held)
        counts = torch.zeros_like(sizes[layer]).scatter_add_(1, held, torch.ones_like(held, dtype=sizes[layer].dtype))
        assert counts.tolist() == sizes[layer].tolist()
        assert sizes[layer].sum(dim=1).tolist() == [64.0] * len(images)
    assert sizes[1].max() > 2  # tokens that absorbed at both layers: unequal sizes met


def test_stale_sizes_of_another_batch_are_not_read(model, images) -> None:
    """Sizes left from a forward of another batch size are ignored by shape, whatever
    resets them between forwards."""
    patched = _patched(model)
    with torch.no_grad():
        patched(images)
        reducer = patched.evit_state.reducer
        reducer.start_forward = lambda *args: None  # no reset: the shape guard alone
        reducer.key_weights.weights = None
        alone = patched(images[:1])
    expected, _ = training_free_forward(model, images[:1], LAYERS, KEEP_RATE)
    torch.testing.assert_close(alone, expected, rtol=1e-7, atol=1e-7)


# -- the mechanisms against loops ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), count=st.integers(2, 20), channels=st.integers(2, 6), data=st.data())
def test_absorb_matches_the_loop_and_conserves_mass(batch, count, channels, data) -> None:
    """(One channel is left out: there every cosine is +-1, and which of the tied kept
    tokens is the partner would be decided by rounding.)"""
    keep = data.draw(st.integers(1, count))
    seed = data.draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, count, channels, generator=generator, dtype=torch.float64)
    scores = torch.rand(batch, count, generator=generator, dtype=torch.float64)
    sizes = torch.randint(1, 5, (batch, count), generator=generator).double()
    out, out_sizes, token_map = absorb_into_kept(image, scores, sizes, keep)
    similarities = absorb_destinations(image, scores, keep)[2]
    for b in range(batch):
        tokens, expected_sizes, kept, destination, similarity = absorb_sample(image[b], scores[b].tolist(),
                                                                              sizes[b].tolist(), keep)
        torch.testing.assert_close(out[b], tokens)
        # absorbed tokens in the product's order (sequence order) against the loop's (score order)
        absorbed = sorted(range(count), key=lambda i: -scores[b, i])[keep:]
        by_token = dict(zip(absorbed, similarity))
        torch.testing.assert_close(similarities[b], torch.tensor([by_token[i] for i in sorted(absorbed)],
                                                                 dtype=torch.float64))
        assert out_sizes[b].tolist() == expected_sizes
        assert token_map.kept_index[b].tolist() == kept
        assert token_map.destination[b].tolist() == destination
    torch.testing.assert_close((out * out_sizes.unsqueeze(-1)).sum(1), (image * sizes.unsqueeze(-1)).sum(1))
    torch.testing.assert_close(out_sizes.sum(1), sizes.sum(1))
    assert token_map.mixed.tolist() == (out_sizes > sizes.gather(1, token_map.kept_index)).tolist()


def test_an_absorbed_token_is_a_renormalized_average() -> None:
    """Two equal tokens absorbed together stay that token (a sum, or weights that do not
    add up to 1, would scale it); sizes weight the average."""
    image = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]])
    out, sizes, _ = absorb_into_kept(image, torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([[1.0, 3.0, 1.0]]), keep=2)
    torch.testing.assert_close(out, torch.tensor([[[7 / 4, 0.0], [0.0, 1.0]]]))
    assert sizes.tolist() == [[4.0, 1.0]]


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), count=st.integers(2, 24), channels=st.integers(2, 6), data=st.data())
def test_bipartite_similarities_match_the_loop(batch, count, channels, data) -> None:
    """The cosine of each merged token with its partner, against ToMe's reference merge:
    what the pooling choice adds up."""
    num_merged = data.draw(st.integers(0, (count + 1) // 2))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    tokens = torch.randn(batch, count, channels, generator=generator, dtype=torch.float64)
    kept_index, destination, similarity = bipartite_matching(tokens, num_merged)
    for b in range(batch):
        _, record = merge_sample(tokens[b], tokens[b], [1.0] * count, num_merged)
        assert kept_index[b].tolist() == record.kept_index and destination[b].tolist() == record.destination
        torch.testing.assert_close(similarity[b], torch.tensor(sorted(pooled_similarities(tokens[b], record),
                                                                      reverse=True), dtype=torch.float64))


def test_pooling_needs_strictly_closer_merges() -> None:
    """The sums decide (not the best single merge), and a tie absorbs, as EViT would."""
    pooled = torch.tensor([[0.9, 0.1], [0.6, 0.6], [0.7, 0.4]])
    absorbed = torch.tensor([[0.6, 0.5], [0.6, 0.6], [0.55, 0.5]])
    assert pools_closer(pooled, absorbed).tolist() == [False, False, True]


def test_token_counts_are_evits(model, images) -> None:
    for pooling in ("never", "always", "closer"):
        patched = _patched(model, pooling)
        with torch.no_grad():
            patched(images)
        counts = [record.mixed.shape[1] for record in patched.evit_state.records]
        assert counts == [kept_count(64, KEEP_RATE), kept_count(kept_count(64, KEEP_RATE), KEEP_RATE)] == [40, 25]


def test_exactly_half_still_pools(model, images) -> None:
    """At keep 0.48 the first layer leaves 32 of 64 tokens: a bipartite merge of exactly
    half, which matching can still do."""
    assert 64 - kept_count(64, 0.48) == (64 + 1) // 2
    expected, _ = training_free_forward(model, images, LAYERS, 0.48, "always")
    absorbed, _ = training_free_forward(model, images, LAYERS, 0.48, "never")
    with torch.no_grad():
        logits = _patched(model, "always", keep_rate=0.48)(images)
    torch.testing.assert_close(logits, expected, rtol=1e-7, atol=1e-7)
    assert (expected - absorbed).abs().max() > 1e-3


def test_below_half_every_layer_absorbs(model, images) -> None:
    """Bipartite matching merges at most half the tokens: at keep 0.3 every layer absorbs."""
    expected, _ = training_free_forward(model, images, LAYERS, 0.3, "never")
    with torch.no_grad():
        logits = _patched(model, "always", keep_rate=0.3)(images)
    torch.testing.assert_close(logits, expected, rtol=1e-7, atol=1e-7)


# -- bf16 autocast ------------------------------------------------------------------------------------------


def test_cpu_bf16_autocast_keeps_scores_and_sums_float32(model, images) -> None:
    fp32 = copy.deepcopy(model).float()
    patched = _patched(fp32, "closer")
    reducer = patched.evit_state.reducer
    seen = []

    def recorded(*similarities):
        seen.extend(similarity.dtype for similarity in similarities)
        return pools_closer(*similarities)

    with mock.patch.object(training_free, "pools_closer", recorded), torch.no_grad(), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        logits = patched(images.float())
        assert reducer.sizes.dtype == torch.float32
    assert seen and set(seen) == {torch.float32}
    with torch.no_grad():
        exact = patched(images.float())
    assert (logits.float().argmax(-1) == exact.argmax(-1)).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = torch.randn(2, 9, 4).to(torch.bfloat16)
        out, sizes, _ = absorb_into_kept(tokens[:, 1:], torch.rand(2, 8), torch.ones(2, 8), 4)
    assert out.dtype == torch.bfloat16 and sizes.dtype == torch.float32


# -- one keyword, the paper unchanged -------------------------------------------------------------------------


def test_apply_evit_selects_the_variant_by_keyword(model, images) -> None:
    patched = evit_patch.apply_evit(copy.deepcopy(model), LAYERS, KEEP_RATE, variant="training-free")
    assert isinstance(patched.evit_state.reducer, TrainingFreeEvit)
    assert patched.state_dict().keys() == model.state_dict().keys()
    evit_patch.remove_evit(patched)
    with torch.no_grad():
        torch.testing.assert_close(patched(images), model(images), rtol=0, atol=0)


def test_the_paper_stays_the_default_and_bitwise(model, images) -> None:
    """The default is the paper's method: raw-score weights that sum to less than 1."""
    with torch.no_grad():
        default = evit_patch.apply_evit(copy.deepcopy(model), LAYERS, KEEP_RATE)(images)
        paper = evit_patch.apply_evit(copy.deepcopy(model), LAYERS, KEEP_RATE, variant="paper")(images)
    assert torch.equal(default, paper)
    torch.testing.assert_close(paper, reference_forward(model, images, LAYERS, KEEP_RATE, True)[0], rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("call, message", [
    (dict(variant="training_free"), "did you mean 'training-free'?"),
    (dict(variant="training-free", fuse=False), "no no-fusion form"),
])
def test_bad_variants_are_refused(model, call, message) -> None:
    with pytest.raises(ValueError, match=message):
        evit_patch.apply_evit(copy.deepcopy(model), LAYERS, KEEP_RATE, **call)


def test_recipes_select_the_variant() -> None:
    recipe = load_recipe(RECIPE, ["reduction.variant=training-free"])
    assert recipe_method(recipe).name == "evit-training-free"
    assert isinstance(recipe_reducer(recipe), TrainingFreeEvit)
    assert recipe_method(load_recipe(RECIPE)).name == "evit"


@pytest.mark.parametrize("overrides, message", [
    (["reduction.variant=training_free"], "did you mean 'training-free'"),
    (["reduction.variant=training-free", "reduction.method=tome"], "form of reducer evit, not of 'tome'"),
    (["reduction.variant=training-free", "reduction.fuse=false"], "no no-fusion form"),
])
def test_recipes_refuse_bad_variants(overrides, message) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPE, overrides)
