"""Hugging Face BEiT (``beit``): the relative position bias each layer hands its attention (the
model's shared one or the layer's own) follows the kept tokens, against the independent eager
reference of :mod:`reference_transformers_bias` (the unpatched layers run sample by sample on the
kept tokens with their bias's rows and columns picked by a plain list). Small configs, random weights."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from reference_bias import bias_rows
from reference_evit import kept_count
from reference_transformers_bias import beit_reference, full_biases

import evit_patch
from evit_patch.core.model_info import prefix_token_count
from evit_patch.reducers import EvitReducer, ToMeMerge

transformers = pytest.importorskip("transformers")

LAYERS = [1, 2]
KEEP_RATE = 0.5
PATCHES = 16
SHARPER = 10.0
BIASES = {"own": {"use_relative_position_bias": True}, "shared": {"use_shared_relative_position_bias": True}}


def _model(bias: str, seed: int = 0, classifier: bool = False, **extra) -> torch.nn.Module:
    """A 4-layer BEiT whose bias tables are drawn (they start at zero) and whose queries and keys are
    scaled up: at random init attention is near uniform, and a wrong row would hardly change a token."""
    torch.manual_seed(seed)
    config = transformers.BeitConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                     image_size=32, patch_size=8, layer_scale_init_value=0.5, num_labels=3,
                                     **BIASES[bias], **extra)
    model = (transformers.BeitForImageClassification if classifier else transformers.BeitModel)(config).eval()
    base = model.beit if classifier else model
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if name.endswith("relative_position_bias_table"):
                parameter.normal_(0.0, 2.0)
        for layer in base.layers:
            layer.attention.q_proj.weight *= SHARPER
            layer.attention.k_proj.weight *= SHARPER
    return model


def _images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _hidden(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images).last_hidden_state


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("bias", BIASES)
def test_keep_rate_one_is_the_unpatched_model_bitwise_and_removal_exact(bias, implementation):
    model, images = _model(bias, classifier=True, attn_implementation=implementation), _images()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        expected = model(images).logits
        evit_patch.apply_evit(model, LAYERS, 1.0)
        assert prefix_token_count(model) == 1
        assert list(model.state_dict()) == list(before)
        assert torch.equal(model(images).logits, expected)
        evit_patch.set_keep_rate(model, KEEP_RATE)
        assert not torch.equal(model(images).logits, expected)
        evit_patch.remove_evit(model)
        assert torch.equal(model(images).logits, expected)
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("bias, fuse, implementation, size", [
    ("own", False, "sdpa", 32), ("own", True, "sdpa", 32), ("shared", False, "sdpa", 32), ("shared", True, "sdpa", 32),
    ("own", False, "eager", 32), ("own", False, "sdpa", 48), ("shared", True, "eager", 48),
])
def test_the_bias_follows_the_kept_tokens_as_the_eager_reference(bias, fuse, implementation, size):
    """Pruning is the one case where the right answer is not a choice; with fusion, the fused token's
    rule (a zero row and column). The same tokens are kept, in the same order; at 48 pixels the bias
    is built for a 6 x 6 grid."""
    model, images = _model(bias, attn_implementation=implementation), _images(size=size)
    with torch.no_grad():
        expected, positions = beit_reference(model, images, LAYERS, KEEP_RATE, fuse)
        evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, EvitReducer(fuse=fuse))
        hidden = _hidden(model, images)
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    first, second = evit_patch.kept_tokens(model)
    for sample, (after_first, after_second) in enumerate(positions):
        assert first.kept_index[sample].tolist() == after_first[: len(after_first) - int(fuse)]
        assert [after_first[j] for j in second.kept_index[sample].tolist()] == after_second[: len(after_second) - int(fuse)]


@pytest.mark.parametrize("fuse", [False, True], ids=["pruning", "fusion"])
def test_every_layer_holds_exactly_the_kept_tokens(fuse):
    """``output_hidden_states`` has one entry per layer, each of the class token + kept (+ fused) tokens."""
    model = evit_patch.apply_token_reducer(_model("own"), LAYERS, KEEP_RATE, EvitReducer(fuse=fuse))
    with torch.no_grad():
        output = model(_images(), output_hidden_states=True)
    counts, n = [1 + PATCHES], PATCHES
    for index in range(4):
        if index in LAYERS:
            n = kept_count(n, KEEP_RATE) + int(fuse)
        counts.append(1 + n)
    assert [state.shape[1] for state in output.hidden_states] == counts
    assert output.last_hidden_state.shape[1] == counts[-1]


@pytest.mark.parametrize("bias", BIASES)
def test_a_merged_token_takes_its_representatives_row_and_column(bias):
    """ToMe-style merging: the second reorganizing layer's attention is given the rows and columns of
    the tokens after the first, the last layer's (not rewritten) those composed through both."""
    model = evit_patch.apply_token_reducer(_model(bias), LAYERS, KEEP_RATE, ToMeMerge(proportional_attention=False))
    seen: dict[int, torch.Tensor] = {}
    for index in (2, 3):
        model.layers[index].attention.follow_attention_bias.register_forward_hook(
            lambda module, args, output, index=index: seen.__setitem__(index, output))
    images = _images()
    with torch.no_grad():
        model(images)
        full = full_biases(model, images)
    first, second = evit_patch.kept_tokens(model)
    for sample in range(2):
        grid = first.kept_index[sample]
        assert torch.equal(seen[2][sample], bias_rows(full[2], 1, grid.tolist())[0])
        assert torch.equal(seen[3][sample], bias_rows(full[3], 1, grid[second.kept_index[sample]].tolist())[0])


def test_pickled_and_copied_models_follow_the_bias():
    model = evit_patch.apply_evit(_model("own"), LAYERS, KEEP_RATE)
    images = _images()
    with torch.no_grad():
        expected = _hidden(model, images)
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert torch.equal(_hidden(clone, images), expected)
            evit_patch.remove_evit(clone)
            assert torch.equal(_hidden(clone, images), _hidden(_model("own"), images))


def test_macs_count_the_kept_tokens():
    model = _model("shared")
    dense = evit_patch.count_macs(model)
    evit_patch.apply_evit(model, LAYERS, KEEP_RATE)
    assert 0.4 * dense < evit_patch.count_macs(model) < 0.8 * dense


@pytest.mark.parametrize("bias", BIASES)
def test_bf16_autocast_runs(bias):
    model = evit_patch.apply_evit(_model(bias, classifier=True), LAYERS, KEEP_RATE)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(_images()).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_interpolating_a_layers_own_bias_to_the_sequence_length_is_refused_in_one_line():
    """A layer's own bias would be interpolated to the shortened sequence's length; the model's shared
    one is built once for the full sequence, and follows as without the flag."""
    images = _images()
    own = evit_patch.apply_evit(_model("own"), LAYERS, KEEP_RATE)
    with torch.no_grad(), pytest.raises(ValueError, match="interpolate_pos_encoding"):
        own(images, interpolate_pos_encoding=True)
    shared = evit_patch.apply_evit(_model("shared"), LAYERS, KEEP_RATE)
    with torch.no_grad():
        assert torch.equal(shared(images, interpolate_pos_encoding=True).last_hidden_state, _hidden(shared, images))
