"""Dense restoration: the full patch grid back from reduced models (forward_intermediates, restore_tokens)."""

import copy

import pytest
import timm
import torch
from reference_dense import reference_grids

import evit_patch
from evit_patch import DROPPED, FUSED, KEPT
from evit_patch.core.restoration import PatchPlaces, restore_sequence

LAYERS = [1, 3, 4]
FILLS = ["source", "carry", "nearest", "similar", "zeros"]


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    options = {"img_size": 48, "patch_size": 8, "embed_dim": 32, "depth": 6, "num_heads": 2, **kwargs}
    return timm.create_model("vit_tiny_patch16_224", **options).eval()


@pytest.fixture(scope="module")
def base():
    return _model()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(1))


def _patched(base, keep_rate=0.5, fill="source", fuse=True):
    model = evit_patch.apply_evit(copy.deepcopy(base), LAYERS, keep_rate, fuse=fuse)
    evit_patch.set_restoration(model, fill)
    return model


def _shapes(output):
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, dict):
        return {key: _shapes(value) for key, value in output.items()}
    return [_shapes(item) for item in output]


def _split(output, intermediates_only=False):
    """(final features or None, intermediates) of what ``forward_intermediates`` returned."""
    if isinstance(output, dict):
        return output.get("image_features"), {key: value for key, value in output.items() if key != "image_features"}
    return (None, output) if intermediates_only else output


def assert_timm_contract(model, base, images, **options):
    """timm's contract: the intermediates have the unpatched shapes, the final features are ``forward_features``."""
    final, intermediates = _split(model.forward_intermediates(images, **options), options.get("intermediates_only"))
    _, expected = _split(base.forward_intermediates(images, **options), options.get("intermediates_only"))
    assert _shapes(intermediates) == _shapes(expected)
    if final is not None and not options.get("stop_early"):
        assert torch.equal(final, model.forward_features(images))


@pytest.mark.parametrize("output_fmt", ["NCHW", "NLC"])
@pytest.mark.parametrize("return_prefix_tokens", [False, True])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("intermediates_only", [False, True])
def test_forward_intermediates_has_the_unpatched_shapes(base, images, output_fmt, return_prefix_tokens, norm,
                                                        intermediates_only):
    options = dict(indices=[0, 1, 2, 4, 5], output_fmt=output_fmt, return_prefix_tokens=return_prefix_tokens,
                   norm=norm, intermediates_only=intermediates_only)
    for fill in FILLS:
        assert_timm_contract(_patched(base, 0.5, fill), base, images, **options)


@pytest.mark.parametrize("kwargs", [{"reg_tokens": 4}, {"class_token": False, "global_pool": "avg"}],
                         ids=["registers", "no-class-token"])
def test_forward_intermediates_shapes_with_other_prefix_counts(images, kwargs):
    base = _model(**kwargs)
    assert_timm_contract(_patched(base), base, images, indices=3, return_prefix_tokens=bool(base.num_prefix_tokens))


def test_forward_features_stays_reduced_and_restore_tokens_gives_the_grid(base, images):
    model = _patched(base, 0.5)
    reduced = model.forward_features(images)
    assert reduced.shape[1] < base.forward_features(images).shape[1]
    assert evit_patch.restore_tokens(model, reduced).shape == base.forward_features(images).shape


@pytest.mark.parametrize("fill", FILLS)
def test_keep_rate_one_is_bitwise_the_unpatched_model(base, images, fill):
    model = _patched(base, 1.0, fill)
    options = dict(indices=None, output_fmt="NLC", return_prefix_tokens=True, norm=True)
    final, intermediates = model.forward_intermediates(images, **options)
    expected_final, expected = base.forward_intermediates(images, **options)
    assert torch.equal(final, expected_final)
    for (grid, prefix), (expected_grid, expected_prefix) in zip(intermediates, expected):
        assert torch.equal(grid, expected_grid) and torch.equal(prefix, expected_prefix)
    if fill not in ("carry", "similar"):
        assert torch.equal(evit_patch.restore_tokens(model, model.forward_features(images), fill),
                           base.forward_features(images))


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("fuse", [True, False], ids=["fusion", "no-fusion"])
def test_every_block_equals_the_eager_reference(base, images, fill, fuse):
    model = _patched(base, 0.5, fill, fuse)
    with torch.no_grad():
        got = model.forward_intermediates(images, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True)
        expected = reference_grids(base, images, LAYERS, 0.5, fuse, fill)
    for block, ((grid, prefix), reference) in enumerate(zip(got, expected)):
        assert block < LAYERS[0] or not torch.equal(grid, expected[0][:, 1:])  # later blocks do change
        torch.testing.assert_close(torch.cat([prefix, grid], dim=1), reference, rtol=1e-4, atol=1e-5)


def _held(kept_per_layer: list[list[int]], num_patches: int, fuse: bool) -> list[tuple[int, int]]:
    """For each patch after the last layer: (its token among the image tokens or -1, its status),
    followed with Python lists from the kept indices alone."""
    tokens = [({p}, False) for p in range(num_patches)]
    for kept in kept_per_layer:
        rest = [t for i, t in enumerate(tokens) if i not in set(kept)]
        tokens = [tokens[i] for i in kept]
        if fuse and rest:
            tokens.append((set().union(*(patches for patches, _ in rest)), True))
    held = [(-1, DROPPED)] * num_patches
    for index, (patches, mixed) in enumerate(tokens):
        for patch in patches:
            held[patch] = (index, FUSED if mixed else KEPT)
    return held


@pytest.mark.parametrize("fuse", [True, False], ids=["fusion", "no-fusion"])
@pytest.mark.parametrize("fill", ["source", "zeros"])
def test_each_kept_token_lands_at_its_own_patch(base, images, fuse, fill):
    """Tokens marked with their own position: the restored grid holds, at every patch, the marker
    of the token that holds it (a kept one at its own patch, in order; the fused one or zeros elsewhere)."""
    model = _patched(base, 0.5, fill, fuse)
    reduced = model.forward_features(images)
    prefix = model.num_prefix_tokens
    markers = torch.arange(reduced.shape[1], dtype=torch.float32).view(1, -1, 1).expand(3, -1, 2) + 1
    restored = evit_patch.restore_tokens(model, markers.contiguous(), fill)
    assert torch.equal(restored[:, :prefix], markers[:, :prefix])
    layers = evit_patch.kept_tokens(model)
    for b in range(3):
        held = _held([layer.kept_index[b].tolist() for layer in layers], restored.shape[1] - prefix, fuse)
        for patch, (token, status) in enumerate(held):
            if status == KEPT or (status == FUSED and fill == "source"):
                expected = float(prefix + token + 1)
            else:
                expected = 0.0
            assert restored[b, prefix + patch].tolist() == [expected, expected], (b, patch, status)


def test_gradients_reach_the_kept_and_the_fused_tokens(base, images):
    model = _patched(base, 0.5, "source")
    reduced = model.forward_features(images).detach().requires_grad_(True)
    restored = evit_patch.restore_tokens(model, reduced)
    restored.square().sum().backward()
    grad = reduced.grad.abs().sum(dim=-1)
    assert (grad[:, 1:] > 0).all()  # every kept token lands somewhere and the fused one holds the rest
    # through forward_intermediates in training, to the backbone behind the fused token and every kept one
    model = _patched(base, 0.5, "carry").train()
    grids = model.forward_intermediates(images, indices=[5], intermediates_only=True)
    grids[0].square().sum().backward()
    assert model.blocks[5].mlp.fc2.weight.grad.abs().sum() > 0 and model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_bf16_autocast(base, images):
    options = dict(indices=[2, 5], output_fmt="NCHW", norm=True, intermediates_only=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = base.forward_intermediates(images, **options)
        same = _patched(base, 1.0).forward_intermediates(images, **options)
        reduced = _patched(base, 0.5).forward_intermediates(images, **options)
    for grid, unpatched, short in zip(same, expected, reduced):
        assert torch.equal(grid, unpatched)
        assert short.shape == unpatched.shape and short.dtype == unpatched.dtype and short.isfinite().all()


def test_tome_unmerges_every_patch_to_the_token_holding_it(base, images):
    model = evit_patch.apply_token_reducer(copy.deepcopy(base), LAYERS, 0.5, evit_patch.reducers.ToMeMerge())
    evit_patch.set_restoration(model, "source")
    final, grids = model.forward_intermediates(images, indices=[5], output_fmt="NLC", norm=True)
    assert grids[0].shape == base.forward_intermediates(images, indices=[5], output_fmt="NLC")[1][0].shape
    outputs = []
    model.norm.register_forward_hook(lambda module, args, output: outputs.append(output))
    model(images)  # the reduced sequence of a plain forward (its pre-hook resets ToMe's sizes)
    held = evit_patch.kept_tokens(model)[-1].token_of_patch
    assert (held >= 0).all()  # merging drops nothing
    reduced = outputs[0]
    assert torch.equal(final, reduced)
    assert torch.equal(grids[0], reduced[:, 1:].gather(1, held.unsqueeze(-1).expand(-1, -1, reduced.shape[-1])))


def test_dense_outputs_restores_forward_features_and_leaves_the_logits(base, images):
    model = _patched(base, 0.5, "carry")
    logits = model(images)
    with evit_patch.dense_outputs(model):
        grid = model.forward_features(images)
        dense_logits = model(images)
    assert grid.shape == base.forward_features(images).shape
    grid_of_last, prefix = model.forward_intermediates(images, indices=[5], norm=True, output_fmt="NLC",
                                                       return_prefix_tokens=True, intermediates_only=True)[0]
    assert torch.equal(grid, torch.cat([prefix, grid_of_last], dim=1))
    torch.testing.assert_close(dense_logits, logits)  # the class token is the same token
    assert model.forward_features(images).shape[1] < grid.shape[1]  # off again outside the context


def test_a_copy_restores_its_own_forward_and_removal_restores_timm(base, images):
    model = _patched(base)
    twin = copy.deepcopy(model)
    twin.forward_intermediates(images, indices=1)
    assert all(record is not None for record in twin.evit_state.records)
    assert all(record is None for record in model.evit_state.records)
    evit_patch.remove_evit(model)
    assert "forward_intermediates" not in vars(model)
    assert torch.equal(model.forward_intermediates(images, indices=[5])[1][0],
                       base.forward_intermediates(images, indices=[5])[1][0])


def test_bad_input_is_a_clear_error(base, images):
    with pytest.raises(ValueError, match="not patched with a token reducer"):
        evit_patch.restore_tokens(base, torch.zeros(1, 37, 32))
    model = _patched(base)
    with pytest.raises(ValueError, match="fill must be one of"):
        evit_patch.set_restoration(model, "mean")
    with pytest.raises(RuntimeError, match="run a forward pass"):
        evit_patch.restore_tokens(model, torch.zeros(3, 37, 32))
    reduced = model.forward_features(images)
    with pytest.raises(ValueError, match="not the last forward's output"):
        evit_patch.restore_tokens(model, reduced[:, :-1])
    for fill in ("carry", "similar"):
        with pytest.raises(ValueError, match=f"fill '{fill}' needs the sequence entering.*forward_intermediates"):
            evit_patch.restore_tokens(model, reduced, fill=fill)
    with pytest.raises(ValueError, match="grid does not hold"):
        evit_patch.restore_tokens(model, reduced, fill="nearest", grid_size=(5, 5))


def test_dynamicvit_in_eval_is_refused_by_name(base, images):
    model = evit_patch.dynamicvit.apply_dynamicvit(copy.deepcopy(base), LAYERS, 0.7)
    with pytest.raises(ValueError, match="DynamicViT.*remove_dynamicvit"):
        model.eval().forward_intermediates(images, indices=1)
    grids = model.train().forward_intermediates(images, indices=1, intermediates_only=True)  # masks: whole sequence
    assert grids[0].shape == base.forward_intermediates(images, indices=1, intermediates_only=True)[0].shape
    evit_patch.dynamicvit.remove_dynamicvit(model)
    assert "forward_intermediates" not in vars(model)


def test_output_dict_and_stop_early_have_the_unpatched_shapes(base, images):
    model = _patched(base, 0.5)
    for options in (dict(indices=[1, 3], stop_early=True), dict(indices=2, output_dict=True, return_prefix_tokens=True)):
        assert_timm_contract(model, base, images, **options)
    final, _ = model.forward_intermediates(images, indices=[1, 3], stop_early=True)
    outputs = []
    model.blocks[3].register_forward_hook(lambda module, args, output: outputs.append(output))
    model.forward_features(images)
    assert torch.equal(final, model.norm(outputs[0]))  # the reduced output of the last block run, normed


def test_carry_refuses_places_started_for_another_prefix_count():
    places = PatchPlaces.start(1, 4, torch.device("cpu"))  # rows placed after no prefix token
    with pytest.raises(ValueError, match="after 0 prefix tokens, the sequence has 1.*num_prefix_tokens=1"):
        restore_sequence(torch.zeros(1, 5, 2), places, 1, "carry", previous=torch.zeros(1, 5, 2))
