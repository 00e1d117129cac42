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

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_evit import reference_forward
from reference_training_free import absorb_sample, is_flat, kept_count, training_free_forward

import evit_patch
from evit_patch.reducers import TrainingFreeEvit, absorb_into_kept, flat_scores
from evit_patch.train.methods import recipe_method, recipe_reducer
from evit_patch.train.recipe import RecipeError, load_recipe

LAYERS = [0, 2]
KEEP_RATE = 0.6  # 64 -> 40 -> 25 image tokens
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "fashion_mnist.yaml"
NEVER, ALWAYS = None, 1e9  # flat thresholds: every layer absorbs / every layer pools
MIXED = 0.0345  # the scores' coefficients of variation at block 0 are 0.0337, 0.0339, 0.0360: two samples pool


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A 4-block float64 ViT on 32 px images in 4 px patches (64 image tokens) with a class
    token and two registers; keys scaled unevenly so that token norms differ. Its class
    attention is nearly flat (coefficient of variation about 0.03), so the thresholds
    above choose each branch."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=4,
                              num_heads=3, reg_tokens=2).eval().double()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[48:96].mul_(torch.linspace(0.2, 3.0, 48, dtype=torch.float64)[:, None])
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _patched(model, threshold, proportional=True, layers=LAYERS, keep_rate=KEEP_RATE):
    reducer = TrainingFreeEvit(flat_threshold=threshold, proportional_attention=proportional)
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


@pytest.mark.parametrize("threshold", [NEVER, ALWAYS, MIXED], ids=["absorb", "pool", "per-sample"])
def test_forward_matches_the_eager_reference(model, images, threshold) -> None:
    expected, expected_sizes = training_free_forward(model, images, LAYERS, KEEP_RATE, threshold)
    logits, sizes = _sizes_of(_patched(model, threshold), images)
    torch.testing.assert_close(logits, expected, rtol=1e-7, atol=1e-7)
    for layer, layer_sizes in enumerate(expected_sizes):
        assert sizes[layer].tolist() == layer_sizes


def test_the_per_sample_threshold_really_mixes_the_batch(model, images) -> None:
    """At MIXED some samples pool at a layer where others absorb, so the per-sample test
    above covers the mixed path."""
    patched = _patched(model, MIXED)
    decisions = []
    reducer = patched.evit_state.reducer
    original = reducer._flat
    reducer._flat = lambda *args: decisions.append(original(*args)) or decisions[-1]
    with torch.no_grad():
        patched(images)
    assert any(0 < int(flat.sum()) < len(flat) for flat in decisions if flat is not None)


def test_each_sample_is_reduced_as_if_alone(model, images) -> None:
    patched = _patched(model, MIXED)
    with torch.no_grad():
        together = patched(images)
        alone = torch.cat([patched(images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(together, alone, rtol=1e-7, atol=1e-7)


def test_the_reference_tells_the_mechanisms_apart(model, images) -> None:
    """Proportional attention, pooling and absorbing each change the reference's logits."""
    base, _ = training_free_forward(model, images, LAYERS, KEEP_RATE, NEVER)
    for other in (training_free_forward(model, images, LAYERS, KEEP_RATE, NEVER, proportional=False)[0],
                  training_free_forward(model, images, LAYERS, KEEP_RATE, ALWAYS)[0]):
        assert (other - base).abs().max() > 1e-3


def test_without_proportional_attention_matches_the_reference(model, images) -> None:
    expected, _ = training_free_forward(model, images, LAYERS, KEEP_RATE, NEVER, proportional=False)
    with torch.no_grad():
        logits = _patched(model, NEVER, proportional=False)(images)
    torch.testing.assert_close(logits, expected, rtol=1e-7, atol=1e-7)


# -- size bookkeeping --------------------------------------------------------------------------------------


def test_sizes_are_conserved_through_two_reorganization_layers(model, images) -> None:
    """Every patch is held by exactly one token after each layer, and the sizes say by how many."""
    patched = _patched(model, NEVER)
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
    patched = _patched(model, NEVER)
    with torch.no_grad():
        patched(images)
        reducer = patched.evit_state.reducer
        reducer.start_forward = lambda *args: None  # no reset: the shape guard alone
        reducer.key_weights.weights = None
        alone = patched(images[:1])
    expected, _ = training_free_forward(model, images[:1], LAYERS, KEEP_RATE, NEVER)
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
    for b in range(batch):
        tokens, expected_sizes, kept, destination = absorb_sample(image[b], scores[b].tolist(), sizes[b].tolist(), keep)
        torch.testing.assert_close(out[b], tokens)
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
@given(batch=st.integers(1, 3), count=st.integers(2, 30), scale=st.floats(1e-3, 1e3), threshold=st.floats(0.05, 3.0),
       seed=st.integers(0, 2**16))
def test_flat_scores_match_the_loop_and_ignore_scale(batch, count, scale, threshold, seed) -> None:
    scores = torch.rand(batch, count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 1e-3
    flat = flat_scores(scores, threshold)
    margins = [abs(s.std(correction=0) / s.mean() - threshold) for s in scores]
    for b in range(batch):
        if margins[b] > 1e-9:  # away from the threshold, where rounding would decide
            assert bool(flat[b]) == is_flat(scores[b].tolist(), threshold)
            assert bool(flat_scores(scores * scale, threshold)[b]) == bool(flat[b])


def test_token_counts_are_evits(model, images) -> None:
    for threshold in (NEVER, ALWAYS):
        patched = _patched(model, threshold)
        with torch.no_grad():
            patched(images)
        counts = [record.mixed.shape[1] for record in patched.evit_state.records]
        assert counts == [kept_count(64, KEEP_RATE), kept_count(kept_count(64, KEEP_RATE), KEEP_RATE)] == [40, 25]


def test_below_half_a_flat_layer_absorbs(model, images) -> None:
    """Bipartite matching merges at most half the tokens: at keep 0.3 every layer absorbs."""
    expected, _ = training_free_forward(model, images, LAYERS, 0.3, NEVER)
    with torch.no_grad():
        logits = _patched(model, ALWAYS, keep_rate=0.3)(images)
    torch.testing.assert_close(logits, expected, rtol=1e-7, atol=1e-7)


# -- bf16 autocast ------------------------------------------------------------------------------------------


def test_cpu_bf16_autocast_keeps_scores_and_sums_float32(model, images) -> None:
    fp32 = copy.deepcopy(model).float()
    patched = _patched(fp32, MIXED)
    reducer = patched.evit_state.reducer
    seen = []
    original = reducer._flat
    reducer._flat = lambda scores, *args: seen.append(scores.dtype) or original(scores, *args)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
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
    recipe = load_recipe(RECIPE, ["evit.variant=training-free"])
    assert recipe_method(recipe).name == "evit-training-free"
    assert isinstance(recipe_reducer(recipe), TrainingFreeEvit)
    assert recipe_method(load_recipe(RECIPE)).name == "evit"


@pytest.mark.parametrize("overrides, message", [
    (["evit.variant=training_free"], "did you mean 'training-free'"),
    (["evit.variant=training-free", "evit.reducer=tome"], "form of reducer evit, not of 'tome'"),
    (["evit.variant=training-free", "evit.fuse=false"], "no no-fusion form"),
])
def test_recipes_refuse_bad_variants(overrides, message) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPE, overrides)
