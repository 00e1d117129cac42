"""Rotary positions follow the kept tokens: timm's ``Eva`` models (EVA-02, DINOv3, Perception
Encoder, RoPE-ViT with one table or one per depth) against the independent eager reference
of :mod:`reference_positions`, which runs the unpatched model's own blocks on each sample's
kept tokens with their own rotary rows. Concurrent calls and torch.compile on a rotary model:
``test_concurrency.py`` and ``test_compile.py`` (``every_method.small_rotary_vit``)."""

from __future__ import annotations

import pytest
import timm
import torch
from patched_clones import pickled_and_copied
from reference_positions import reference_forward, rotary_rows

import evit_patch
from evit_patch.reducers import EvitReducer, ToMeMerge, TrainingFreeEvit, evit_reduction

SMALL = {"depth": 4, "embed_dim": 64, "num_heads": 2, "img_size": 64, "num_classes": 10}
ROTARY_MODELS = {
    "eva02 (cat, EVA attention)": "eva02_tiny_patch14_224",
    "dinov3 (registers, continuous coordinates)": "vit_small_patch16_dinov3",
    "perception encoder (AttentionRope)": "vit_pe_core_tiny_patch16_384",
    "rope-vit mixed (one table per depth)": "vit_small_patch16_rope_mixed_224",
}
LAYERS = [1, 2]
KEEP_RATE = 0.5


def _model(name: str) -> torch.nn.Module:
    """Random weights, with a head of unit scale (timm's initial head gives logits near 1e-4,
    under the comparisons' tolerance)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL).eval()
    torch.nn.init.normal_(model.head.weight)
    return model


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ROTARY_MODELS.values(), ids=ROTARY_MODELS.keys())
@pytest.mark.parametrize("reducer", [EvitReducer(), EvitReducer(fuse=False), ToMeMerge(), TrainingFreeEvit()],
                         ids=["evit", "no-fusion", "tome", "training-free"])
def test_keep_rate_one_is_the_unpatched_model_bitwise(name, reducer):
    model = _model(name)
    images = _images()
    with torch.no_grad():
        expected = model(images)
        evit_patch.apply_token_reducer(model, LAYERS, 1.0, reducer)
        assert torch.equal(model(images), expected)
        evit_patch.set_keep_rate(model, KEEP_RATE)
        model(images)
        evit_patch.remove_evit(model)
        assert torch.equal(model(images), expected)


@pytest.mark.parametrize("name", ROTARY_MODELS.values(), ids=ROTARY_MODELS.keys())
@pytest.mark.parametrize("fuse", [False, True], ids=["pruning", "fused token unrotated"])
def test_positions_follow_the_kept_tokens_as_the_eager_reference(name, fuse):
    model = _model(name)
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


@pytest.mark.parametrize("rule", ["members", "top-member"])
@pytest.mark.parametrize("name", ROTARY_MODELS.values(), ids=ROTARY_MODELS.keys())
def test_a_rule_rotates_a_fused_token_as_the_reference_places_it(name, rule):
    """``members``: by its members' mean row; ``top-member``: by its highest-scored dropped token's row."""
    model = _model(name)
    images = _images()
    with torch.no_grad():
        expected, positions = reference_forward(model, images, LAYERS, KEEP_RATE, fuse=True,
                                                members=rule == "members", top_member=rule == "top-member")
        unrotated, _ = reference_forward(model, images, LAYERS, KEEP_RATE, fuse=True)
        evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, EvitReducer())
        evit_patch.set_position_rule(model, rule)
        logits = model(images)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    if "mixed" not in name:  # random per-depth frequencies rotate so little that the two rules agree to 1e-6
        assert not torch.allclose(logits, unrotated, rtol=1e-5, atol=1e-5)  # the rule changed something
    first, second = evit_patch.kept_tokens(model)
    for sample, (after_first, after_second) in enumerate(positions):  # the fusion is the same as the reference's
        assert first.kept_index[sample].tolist() == after_first[:-1]
        assert [after_first[j] for j in second.kept_index[sample].tolist()] == after_second[:-1]


@pytest.mark.parametrize("reducer", [ToMeMerge(), TrainingFreeEvit()], ids=["tome", "training-free"])
def test_a_merged_token_sits_at_the_mean_of_its_grid_tokens_by_default(reducer):
    """Merging reducers default to the rule ``members``: the rows a later block is given are the
    mean rows of the grid tokens each token holds (composed through two layers), each weighing one."""
    model = _model("eva02_tiny_patch14_224")
    evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, reducer)
    seen: list[torch.Tensor] = []
    model.blocks[3].register_forward_pre_hook(lambda block, args, kwargs: seen.append(kwargs["rope"]), with_kwargs=True)
    with torch.no_grad():
        model(_images())
    last = evit_patch.kept_tokens(model)[-1]
    table = model.rope.get_embed()
    for sample in range(2):
        holder = last.token_of_patch[sample].tolist()
        groups = [tuple(g for g, token in enumerate(holder) if token == j) for j in range(max(holder) + 1)]
        assert sum(len(group) > 1 for group in groups) > 0  # some tokens were merged
        torch.testing.assert_close(seen[0][sample, 0], rotary_rows(table, groups), rtol=1e-6, atol=1e-6)


def test_the_top_member_rule_gives_later_blocks_the_rows_of_the_references_positions():
    """The rows a block after both layers is given: each kept token's own, the fused token's that of
    its highest-scored member as the reference places it (composed through both layers)."""
    model = _model("eva02_tiny_patch14_224")
    images = _images()
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        _, positions = reference_forward(model, images, LAYERS, KEEP_RATE, fuse=True, top_member=True)
        evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
        evit_patch.set_position_rule(model, "top-member")
        model.blocks[3].register_forward_pre_hook(lambda block, args, kwargs: seen.append(kwargs["rope"]),
                                                  with_kwargs=True)
        model(images)
    table = model.rope.get_embed()
    for sample, (_, after_second) in enumerate(positions):
        assert None not in after_second
        torch.testing.assert_close(seen[0][sample, 0], rotary_rows(table, after_second), rtol=0, atol=0)


@pytest.mark.parametrize("reducer", [ToMeMerge(), TrainingFreeEvit()], ids=["tome", "training-free"])
def test_the_top_member_rule_places_a_merged_token_as_the_representative_rule_exactly(reducer):
    model = _model("eva02_tiny_patch14_224")
    images = _images()
    evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, reducer)
    evit_patch.set_position_rule(model, "representative")
    with torch.no_grad():
        expected = model(images)
        evit_patch.set_position_rule(model, "top-member")
        assert torch.equal(model(images), expected)


@pytest.mark.parametrize("name", ROTARY_MODELS.values(), ids=ROTARY_MODELS.keys())
def test_the_top_member_rule_at_keep_rate_one_is_the_unpatched_model_bitwise(name):
    model = _model(name)
    images = _images()
    with torch.no_grad():
        expected = model(images)
        evit_patch.apply_evit(model, LAYERS, 1.0)
        evit_patch.set_position_rule(model, "top-member")
        assert torch.equal(model(images), expected)


def test_the_top_member_rule_keeps_and_fuses_the_same_tokens_bitwise():
    """Recording the top member changes nothing the reducer computes; it is the highest-scored
    token not kept, an index only (no autograd graph)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1 + 16, 8, generator=generator)
    scores = torch.rand(3, 16, generator=generator).requires_grad_()
    plain = evit_reduction(x, scores, 1, KEEP_RATE)
    placed = evit_reduction(x, scores, 1, KEEP_RATE, top_member=True)
    assert torch.equal(placed.tokens, plain.tokens) and torch.equal(placed.kept_index, plain.kept_index)
    assert plain.map.top_member is None and not placed.map.top_member.requires_grad
    for sample in range(3):
        dropped = [j for j in range(16) if j not in plain.kept_index[sample].tolist()]
        assert placed.map.top_member[sample].tolist() == [max(dropped, key=lambda j: scores[sample, j].item())]


def test_pickled_and_copied_models_keep_the_top_member_rule():
    model = _model("eva02_tiny_patch14_224")
    evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
    evit_patch.set_position_rule(model, "top-member")
    for clone in pickled_and_copied(model, _images()):
        assert not clone.blocks[3]._forward_pre_hooks


def test_a_position_rule_that_does_not_exist_is_refused_in_one_line():
    model = _model("eva02_tiny_patch14_224")
    evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
    with pytest.raises(ValueError, match="position rule 'centre' is not one of representative, members, top-member; pass one of those"):
        evit_patch.set_position_rule(model, "centre")


def test_a_merged_token_takes_its_representatives_rotary_row():
    """ToMe-style merging by the rule ``representative``: an output token is rotated as the token it
    stands for (the map's ``kept_index``), which the rows composed through two layers must give."""
    model = _model("eva02_tiny_patch14_224")
    evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, ToMeMerge())
    evit_patch.set_position_rule(model, "representative")
    seen: list[torch.Tensor] = []
    model.blocks[3].register_forward_pre_hook(lambda block, args, kwargs: seen.append(kwargs["rope"]), with_kwargs=True)
    with torch.no_grad():
        model(_images())
    first, second = evit_patch.kept_tokens(model)
    table = model.rope.get_embed()
    for sample in range(2):
        grid = first.kept_index[sample][second.kept_index[sample]].tolist()
        torch.testing.assert_close(seen[0][sample, 0], rotary_rows(table, grid), rtol=0, atol=0)


def test_pickled_and_copied_models_follow_positions():
    model = _model("vit_small_patch16_rope_mixed_224")
    evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
    for clone in pickled_and_copied(model, _images()):
        assert not clone.blocks[3]._forward_pre_hooks


def test_macs_and_kept_tokens_on_a_rotary_model():
    model = _model("vit_small_patch16_dinov3")
    dense = evit_patch.count_macs(model)
    evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
    assert evit_patch.count_macs(model) < dense
    with torch.no_grad():
        model(_images())
    first, second = evit_patch.kept_tokens(model)
    assert first.kept_index.shape[1] == 8 and second.kept_index.shape[1] == 5  # 16 patches; 8 kept, fused; 9 -> 5


def test_forward_intermediates_gives_the_full_grid_on_a_rotary_model():
    """DINOv3's dense users read ``forward_intermediates``: bitwise at keep 1.0, the full grid below."""
    model = _model("vit_small_patch16_dinov3")
    images = _images()
    with torch.no_grad():
        expected = model.forward_intermediates(images, intermediates_only=True)
        evit_patch.apply_evit(model, LAYERS, 1.0)
        assert all(torch.equal(a, b) for a, b in zip(model.forward_intermediates(images, intermediates_only=True), expected))
        evit_patch.set_keep_rate(model, KEEP_RATE)
        reduced = model.forward_intermediates(images, intermediates_only=True)
    assert [tuple(map_.shape) for map_ in reduced] == [(2, 64, 4, 4)] * 4
    assert torch.equal(reduced[0], expected[0]) and not torch.equal(reduced[-1], expected[-1])


class _PositionalEva(torch.nn.Module):
    """An Eva whose blocks are called with the table in its place (``blk(x, rope)``), not by keyword."""

    def __init__(self, eva: torch.nn.Module) -> None:
        super().__init__()
        self.eva = eva
        self.blocks, self.patch_embed, self.cls_token, self.rope = eva.blocks, eva.patch_embed, eva.cls_token, eva.rope
        self.num_prefix_tokens = eva.num_prefix_tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, rope = self.eva._pos_embed(self.eva.patch_embed(images))
        x = self.eva.norm_pre(x)
        for block in self.blocks:
            x = block(x, rope)
        return self.eva.forward_head(self.eva.norm(x))


def test_a_table_passed_in_its_place_follows_too(monkeypatch):
    eva = _model("eva02_tiny_patch14_224")
    images = _images()
    with torch.no_grad():
        expected, _ = reference_forward(eva, images, LAYERS, KEEP_RATE, fuse=True)
        model = _PositionalEva(eva)
        monkeypatch.setattr(evit_patch.core.model_info, "Eva", (type(eva), _PositionalEva))
        evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_small_patch16_rope_mixed_224"])
def test_training_with_patch_dropout_follows_the_batched_table(name):
    """timm's patch dropout hands the blocks a per-sample table (``[B, 1, N, D]`` or per depth
    ``[B, H, N, D]``) for the patches it kept; the reduction follows it from there."""
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL, patch_drop_rate=0.25).train()
    evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
    logits = model(_images())
    logits.sum().backward()
    first, second = evit_patch.kept_tokens(model)
    assert first.kept_index.shape == (2, 6) and second.kept_index.shape == (2, 4)  # 16 patches, 12 after dropout
    assert all(p.grad is not None for p in model.blocks[3].attn.parameters() if p.requires_grad)


def test_keep_rate_for_a_budget_on_a_rotary_model():
    model = _model("eva02_tiny_patch14_224")
    budget = 0.7 * evit_patch.count_macs(model)
    rate = evit_patch.keep_rate_for_budget(model, budget, LAYERS)
    evit_patch.apply_evit(model, LAYERS, rate)
    assert 0.9 * budget <= evit_patch.count_macs(model) <= budget


def test_a_torch_fx_trace_of_a_rotary_model_follows_each_forward():
    """timm's feature extractors trace the whole model: the table is a constant there, and the
    rows must still be gathered per forward (a batch of 3 after a trace run on a batch of 2)."""
    model = _model("vit_small_patch16_rope_mixed_224")
    evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
    small, large = _images(2), torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = [model(small), model(large)]
        traced = torch.fx.symbolic_trace(model)
        assert torch.equal(traced(small), expected[0]) and torch.equal(traced(large), expected[1])
