"""Hugging Face DINOv3 (``dinov3_vit``): the ``(cos, sin)`` rotary pair its model hands every
layer follows the kept tokens, against the independent eager reference of
:mod:`reference_transformers_positions` (the unpatched layers run sample by sample on the kept
tokens with their own rows). Small configs, random weights."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from reference_evit import kept_count
from reference_transformers_positions import dinov3_reference, pair_rows

import evit_patch
from evit_patch.core.model_info import prefix_token_count
from evit_patch.reducers import EvitReducer, OracleGuided, RandomDrop, ToMeMerge, TrainingFreeEvit

transformers = pytest.importorskip("transformers")

LAYERS = [1, 2]
KEEP_RATE = 0.5
REGISTERS = 2
PATCHES = 16
SHARPER = 10.0


def _config() -> "transformers.DINOv3ViTConfig":
    return transformers.DINOv3ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                                        intermediate_size=128, image_size=32, patch_size=8,
                                        num_register_tokens=REGISTERS, layerscale_value=0.5)


def _model(seed: int = 0) -> torch.nn.Module:
    """Queries and keys scaled up: at random init attention is near uniform, and rows given to
    the wrong tokens would hardly change the tokens."""
    torch.manual_seed(seed)
    model = transformers.DINOv3ViTModel(_config()).eval()
    with torch.no_grad():
        for layer in model.model.layer:
            layer.attention.q_proj.weight *= SHARPER
            layer.attention.k_proj.weight *= SHARPER
    return model


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


REDUCERS = {
    "evit": lambda: EvitReducer(),
    "no-fusion": lambda: EvitReducer(fuse=False),
    "random": lambda: RandomDrop(seed=0),
    "tome": lambda: ToMeMerge(proportional_attention=False),  # transformers' attention takes no key weights
    "training-free": lambda: TrainingFreeEvit(proportional_attention=False),
    "oracle": lambda: OracleGuided(_model(1), LAYERS),
}


def _hidden(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images).last_hidden_state


@pytest.mark.parametrize("reducer", REDUCERS.values(), ids=REDUCERS.keys())
def test_keep_rate_one_is_the_unpatched_model_bitwise_and_removal_exact(reducer):
    model, images = _model(), _images()
    with torch.no_grad():
        expected = _hidden(model, images)
        evit_patch.apply_token_reducer(model, LAYERS, 1.0, reducer())
        assert prefix_token_count(model) == 1 + REGISTERS
        assert torch.equal(_hidden(model, images), expected)
        evit_patch.set_keep_rate(model, KEEP_RATE)
        assert _hidden(model, images).shape[1] < expected.shape[1]
        evit_patch.remove_evit(model)
        assert torch.equal(_hidden(model, images), expected)


@pytest.mark.parametrize("fuse", [False, True], ids=["pruning", "fused token unrotated"])
def test_positions_follow_the_kept_tokens_as_the_eager_reference(fuse):
    """Pruning is the one case where the right answer is not a choice; with fusion, the fused
    token's rule (no rotation). The same tokens are kept, in the same order."""
    model, images = _model(), _images()
    with torch.no_grad():
        expected, positions = dinov3_reference(model, images, LAYERS, KEEP_RATE, fuse)
        evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, EvitReducer(fuse=fuse))
        hidden = _hidden(model, images)
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    first, second = evit_patch.kept_tokens(model)
    for sample, (after_first, after_second) in enumerate(positions):
        assert first.kept_index[sample].tolist() == after_first[: len(after_first) - int(fuse)]
        assert [after_first[j] for j in second.kept_index[sample].tolist()] == after_second[: len(after_second) - int(fuse)]


@pytest.mark.parametrize("rule", ["members", "top-member"])
def test_a_rule_rotates_a_fused_token_as_the_reference_places_it(rule):
    """``members``: by its members' mean rows; ``top-member``: by its highest-scored dropped token's."""
    model, images = _model(), _images()
    with torch.no_grad():
        expected, _ = dinov3_reference(model, images, LAYERS, KEEP_RATE, True, members=rule == "members",
                                       top_member=rule == "top-member")
        unrotated, _ = dinov3_reference(model, images, LAYERS, KEEP_RATE, True)
        evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, EvitReducer())
        evit_patch.set_position_rule(model, rule)
        hidden = _hidden(model, images)
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hidden, unrotated, rtol=1e-5, atol=1e-5)  # the rule changed something


@pytest.mark.parametrize("fuse", [False, True], ids=["pruning", "fusion"])
def test_every_layer_holds_exactly_the_kept_tokens(fuse):
    """``output_hidden_states`` has one entry per layer, each of prefix + kept (+ fused) tokens."""
    model = evit_patch.apply_token_reducer(_model(), LAYERS, KEEP_RATE, EvitReducer(fuse=fuse))
    with torch.no_grad():
        output = model(_images(), output_hidden_states=True)
    counts, n = [1 + REGISTERS + PATCHES], PATCHES
    for index in range(4):
        if index in LAYERS:
            n = kept_count(n, KEEP_RATE) + int(fuse)
        counts.append(1 + REGISTERS + n)
    assert [state.shape[1] for state in output.hidden_states] == counts
    torch.testing.assert_close(model.norm(output.hidden_states[-1]), output.last_hidden_state)


def test_a_merged_token_takes_its_representatives_rows():
    """ToMe-style merging by the rule ``representative``: the last layer (not rewritten) is given the
    rows of each token's representative, composed through both reorganizing layers."""
    model = evit_patch.apply_token_reducer(_model(), LAYERS, KEEP_RATE, ToMeMerge(proportional_attention=False))
    evit_patch.set_position_rule(model, "representative")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    model.model.layer[3].register_forward_pre_hook(
        lambda layer, args, kwargs: seen.append(kwargs["position_embeddings"]), with_kwargs=True)
    images = _images()
    with torch.no_grad():
        model(images)
        cos, sin = model.rope_embeddings(images)
    first, second = evit_patch.kept_tokens(model)
    for sample in range(2):
        grid = first.kept_index[sample][second.kept_index[sample]].tolist()
        for got, want in zip(seen[0], pair_rows(cos, sin, grid)):
            assert torch.equal(got[sample, 0], want)


def test_training_with_augmented_coordinates_and_drop_path():
    """In training DINOv3 shifts its patch coordinates (a new table each forward); the rows follow
    it, and every later layer gets gradient."""
    torch.manual_seed(0)
    config = _config()
    config.pos_embed_shift, config.drop_path_rate = 0.1, 0.1
    model = evit_patch.apply_evit(transformers.DINOv3ViTModel(config).train(), LAYERS, KEEP_RATE)
    output = model(_images())
    output.pooler_output.square().sum().backward()
    assert output.last_hidden_state.shape == (2, 1 + REGISTERS + 6, 64)  # 16 -> 8 + fused; 9 -> 5 + fused
    assert all(p.grad is not None for p in model.model.layer[3].parameters())


def test_pickled_and_copied_models_follow_positions():
    model = evit_patch.apply_evit(_model(), LAYERS, KEEP_RATE)
    images = _images()
    with torch.no_grad():
        expected = _hidden(model, images)
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert torch.equal(_hidden(clone, images), expected)
            evit_patch.remove_evit(clone)
            assert not clone.model.layer[3]._forward_pre_hooks
            assert torch.equal(_hidden(clone, images), _hidden(_model(), images))


def test_dense_outputs_give_the_full_grid():
    model = evit_patch.apply_evit(_model(), LAYERS, KEEP_RATE)
    with torch.no_grad(), evit_patch.dense_outputs(model):
        dense = model(_images(), output_hidden_states=True)
    assert dense.last_hidden_state.shape[1] == 1 + REGISTERS + PATCHES
    assert all(state.shape[1] == 1 + REGISTERS + PATCHES for state in dense.hidden_states)


def test_macs_and_a_keep_rate_for_a_budget():
    model = _model()
    dense = evit_patch.count_macs(model)
    rate = evit_patch.keep_rate_for_budget(model, 0.7 * dense, LAYERS)
    evit_patch.apply_evit(model, LAYERS, rate)
    assert 0.6 * dense <= evit_patch.count_macs(model) <= 0.7 * dense


def test_the_backbone_is_refused_with_the_way_to_the_grid():
    model = transformers.DINOv3ViTBackbone(_config()).eval()
    with pytest.raises(evit_patch.UnsupportedModelError, match="dense_outputs"):
        evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
    assert not evit_patch.is_patched(model)
