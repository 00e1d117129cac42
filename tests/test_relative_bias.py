"""A relative position bias follows the kept tokens: timm's BEiT (each attention's own table, or
one shared by the model) and ViT-RelPos (each attention's ``rel_pos`` MLP, with and without a
class token, or one shared by the model) against the independent eager reference of
:mod:`reference_bias`, which runs the unpatched model's own blocks on each sample's kept tokens
with the rows and columns of their bias picked by a plain list of grid positions. Concurrent
calls, torch.compile and pickling on a BEiT: ``test_concurrency.py``, ``test_compile.py``
(``every_method.small_bias_vit``)."""

from __future__ import annotations

import pytest
import timm
import torch
from every_method import BIAS_METHODS, PATCHES, small_bias_vit
from patched_clones import pickled_and_copied
from reference_bias import bias_rows, reference_forward

import evit_patch
from evit_patch import UnsupportedModelError
from evit_patch.dynamicvit import apply_dynamicvit
from evit_patch.reducers import EvitReducer, RandomDrop, ToMeMerge, TrainingFreeEvit

SMALL = {"depth": 4, "embed_dim": 64, "num_heads": 2, "img_size": 64, "num_classes": 10}
BIAS_MODELS = {
    "beit (each attention's table)": ("beit_base_patch16_224", {}),
    "beit shared by the model": ("beit_base_patch16_224", {"use_rel_pos_bias": False, "use_shared_rel_pos_bias": True}),
    "vit_relpos (mlp, no class token)": ("vit_relpos_small_patch16_224", {}),
    "vit_relpos cls (class token, zero prefix bias)": ("vit_relpos_medium_patch16_cls_224", {}),
    "vit_srelpos (shared by the model)": ("vit_srelpos_small_patch16_224", {}),
}
LAYERS = [1, 2]
KEEP_RATE = 0.5


def _model(name: str, options: dict | None = None) -> torch.nn.Module:
    """A small build whose bias is not 0 (timm starts BEiT's tables at 0) and whose logits are not
    close to 0 (timm starts the heads at 0 or 1e-3 of a normal draw and some LayerScales at 1e-5,
    which would hide any error at 1e-5)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL, **(options or {})).eval()
    with torch.no_grad():
        model.head.weight.normal_()
        for parameter_name, parameter in model.named_parameters():
            if "relative_position_bias_table" in parameter_name or "rel_pos" in parameter_name:
                parameter.normal_(0, 0.5)
            elif "gamma" in parameter_name:
                parameter.fill_(1.0)
    return model


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("name", "options"), BIAS_MODELS.values(), ids=BIAS_MODELS.keys())
@pytest.mark.parametrize("reducer", [EvitReducer(), EvitReducer(fuse=False), ToMeMerge(), TrainingFreeEvit()],
                         ids=["evit", "no-fusion", "tome", "training-free"])
def test_keep_rate_one_is_the_unpatched_model_bitwise(name, options, reducer):
    model = _model(name, options)
    images = _images()
    keys = model.state_dict().keys()
    with torch.no_grad():
        expected = model(images)
        evit_patch.apply_token_reducer(model, LAYERS, 1.0, reducer)
        assert torch.equal(model(images), expected) and model.state_dict().keys() == keys
        evit_patch.set_keep_rate(model, KEEP_RATE)
        model(images)
        evit_patch.remove_evit(model)
        assert torch.equal(model(images), expected)


@pytest.mark.parametrize(("name", "options"), BIAS_MODELS.values(), ids=BIAS_MODELS.keys())
@pytest.mark.parametrize("fuse", [False, True], ids=["pruning", "fused token bias-free"])
def test_the_bias_follows_the_kept_tokens_as_the_eager_reference(name, options, fuse):
    model = _model(name, options)
    images = _images()
    with torch.no_grad():
        expected, positions = reference_forward(model, images, LAYERS, KEEP_RATE, fuse)
        evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, EvitReducer(fuse=fuse))
        logits = model(images)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    first, second = evit_patch.kept_tokens(model)
    for sample, (after_first, after_second) in enumerate(positions):  # the same tokens kept, in the same order
        assert first.kept_index[sample].tolist() == after_first[: len(after_first) - int(fuse)]
        assert [after_first[j] for j in second.kept_index[sample].tolist()] == after_second[: len(after_second) - int(fuse)]


@pytest.mark.parametrize(("name", "options"), BIAS_MODELS.values(), ids=BIAS_MODELS.keys())
def test_the_top_member_rule_gives_a_fused_token_its_top_dropped_tokens_row_and_column(name, options):
    """The rule ``top-member`` places the fused token by one origin, which the bias gathers like any other."""
    model = _model(name, options)
    images = _images()
    with torch.no_grad():
        expected, _ = reference_forward(model, images, LAYERS, KEEP_RATE, fuse=True, top_member=True)
        bias_free, _ = reference_forward(model, images, LAYERS, KEEP_RATE, fuse=True)
        evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
        evit_patch.set_position_rule(model, "top-member")
        logits = model(images)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, bias_free, rtol=1e-5, atol=1e-5)  # the rule changed something


@pytest.mark.parametrize("reducer", [ToMeMerge(), TrainingFreeEvit(pooling="never")], ids=["tome", "absorbing"])
def test_a_merged_token_takes_its_representatives_row_and_column(reducer):
    """A merged or absorbing token is biased as the token it stands for (the map's ``kept_index``),
    which the rows and columns composed through two layers must give (block 3 is not rewritten). A bias
    has no mean of several positions, so merging reducers take ``representative`` by default here."""
    model = _model("beit_base_patch16_224")
    evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, reducer)
    assert model.evit_state.position_rule == "representative"
    seen: list[torch.Tensor] = []
    model.blocks[3].attn.follow_attention_bias.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        model(_images())
        full = model.blocks[3].attn.relative_position_bias_table[model.blocks[3].attn.relative_position_index]
    full = full.permute(2, 0, 1).unsqueeze(0)
    first, second = evit_patch.kept_tokens(model)
    for sample in range(2):
        grid = first.kept_index[sample][second.kept_index[sample]].tolist()
        torch.testing.assert_close(seen[0][sample:sample + 1], bias_rows(full, 1, grid), rtol=0, atol=0)


@pytest.mark.parametrize("method", BIAS_METHODS)
def test_every_token_method_runs_on_a_bias_model_and_comes_off_exactly(method):
    model = small_bias_vit()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
        PATCHES[method](model)
        reduced = model(images)
        assert torch.isfinite(reduced).all() and not torch.equal(reduced, expected)
        assert 32 <= evit_patch.kept_tokens(model)[0].kept_index.shape[1] < 64
        evit_patch.remove_evit(model)
        assert torch.equal(model(images), expected)


def test_dynamicvit_refuses_a_bias_model_with_its_reason():
    model = small_bias_vit()
    with pytest.raises(UnsupportedModelError, match="DynamicViT"):
        apply_dynamicvit(model, [1, 2], 0.6)
    assert not evit_patch.is_patched(model)


def test_random_drop_follows_the_bias_of_the_tokens_it_keeps():
    """Random drop with no fusion is pruning: the reference of its own kept tokens (read off the maps)."""
    model = _model("beit_base_patch16_224")
    images = _images()
    evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, RandomDrop(seed=0))
    seen: list[torch.Tensor] = []
    model.blocks[3].attn.follow_attention_bias.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        model(images)
        full = model.blocks[3].attn.relative_position_bias_table[model.blocks[3].attn.relative_position_index]
    full = full.permute(2, 0, 1).unsqueeze(0)
    first, second = evit_patch.kept_tokens(model)
    for sample in range(2):
        grid = first.kept_index[sample][second.kept_index[sample]].tolist()
        torch.testing.assert_close(seen[0][sample:sample + 1], bias_rows(full, 1, grid), rtol=0, atol=0)


def test_pickled_and_copied_models_follow_the_bias():
    model = _model("beit_base_patch16_224")
    evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
    for clone in pickled_and_copied(model, _images()):
        assert type(clone.blocks[3].attn).__name__ == "Attention"


def test_macs_kept_tokens_and_budget_on_a_bias_model():
    model = _model("vit_relpos_medium_patch16_cls_224")
    dense = evit_patch.count_macs(model)
    budget = 0.7 * dense
    rate = evit_patch.keep_rate_for_budget(model, budget, LAYERS)
    evit_patch.apply_evit(model, LAYERS, rate)
    assert 0.9 * budget <= evit_patch.count_macs(model) <= budget < dense
    evit_patch.set_keep_rate(model, KEEP_RATE)
    with torch.no_grad():
        model(_images())
    first, second = evit_patch.kept_tokens(model)
    assert first.kept_index.shape[1] == 8 and second.kept_index.shape[1] == 5  # 16 patches; 8 kept, fused; 9 -> 5


def test_forward_intermediates_gives_the_full_grid_on_a_bias_model():
    model = _model("beit_base_patch16_224")
    images = _images()
    with torch.no_grad():
        expected = model.forward_intermediates(images, intermediates_only=True)
        evit_patch.apply_evit(model, LAYERS, 1.0)
        assert all(torch.equal(a, b) for a, b in zip(model.forward_intermediates(images, intermediates_only=True), expected))
        evit_patch.set_keep_rate(model, KEEP_RATE)
        reduced = model.forward_intermediates(images, intermediates_only=True)
    assert [tuple(map_.shape) for map_ in reduced] == [(2, 64, 4, 4)] * 4
    assert torch.equal(reduced[0], expected[0]) and not torch.equal(reduced[-1], expected[-1])


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "vit_srelpos_small_patch16_224"])
def test_a_torch_fx_trace_of_a_bias_model_follows_each_forward(name):
    """A whole-model trace (timm's feature extractors) gathers the bias per forward: a batch of 3
    after a trace run on a batch of 2."""
    model = _model(name)
    evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
    small, large = _images(2), torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = [model(small), model(large)]
        traced = torch.fx.symbolic_trace(model)
        assert torch.equal(traced(small), expected[0]) and torch.equal(traced(large), expected[1])


def test_training_reaches_the_bias_tables():
    model = _model("beit_base_patch16_224").train()
    evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
    model(_images()).sum().backward()
    assert all(block.attn.relative_position_bias_table.grad is not None for block in model.blocks)


def test_non_fused_attention_is_refused_in_one_line():
    model = _model("beit_base_patch16_224")
    for block in model.blocks:
        block.attn.fused_attn = False
    with pytest.raises(UnsupportedModelError, match="non-fused attention"):
        evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
    assert not evit_patch.is_patched(model)


def test_a_shared_and_an_own_bias_together_are_refused():
    model = _model("beit_base_patch16_224", {"use_shared_rel_pos_bias": True})
    with pytest.raises(UnsupportedModelError, match="shared by the model to each attention's own"):
        evit_patch.apply_evit(model, LAYERS, KEEP_RATE)


def test_the_members_position_rule_is_refused_for_a_bias_in_one_line():
    model = evit_patch.apply_evit(small_bias_vit(0), [1, 2], 0.5)
    with pytest.raises(ValueError, match="has a relative position bias, which has no mean of several positions; keep the position rule"):
        evit_patch.set_position_rule(model, "members")
    assert model.evit_state.position_rule == "representative"
