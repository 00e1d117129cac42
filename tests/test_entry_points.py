"""Every reducer gives fresh, correct results whatever runs the model.

Per-forward state (the record behind ``kept_tokens``, ToMe's token sizes and key weights,
the oracle's scores) must be reset by any entry point: ``model(x)``, a keyword call,
``forward_features`` + ``forward_head``, transformers' ``pixel_values=``, open_clip's
``encode_image``. Each case runs a patched model through earlier forwards of another
batch size and of other images, then the entry point under test, and compares with a
freshly patched twin that went through the same forwards by the plain call. An empty
batch gives an empty output where the unpatched model does (timm; transformers' and
open_clip's own layers refuse one).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import evit_patch
from evit_patch.core.model_info import transformer_blocks
from evit_patch.reducers import EvitReducer, OracleGuided, RandomDrop, ToMeMerge

LAYERS = [1, 2]
KEEP = 0.6


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2,
                             num_classes=5).eval()


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


EARLIER = (images(4, 10), images(2, 11))  # another batch size, then the same size with other images

REDUCERS = {  # name -> reducer of (oracle model, whether the family's attention takes key weights)
    "evit": lambda oracle, key_weights: EvitReducer(),
    "evit-no-fusion": lambda oracle, key_weights: EvitReducer(fuse=False),
    "random": lambda oracle, key_weights: RandomDrop(seed=3),
    "tome": lambda oracle, key_weights: ToMeMerge(proportional_attention=key_weights),
    "oracle": lambda oracle, key_weights: OracleGuided(oracle, LAYERS),
}


def other_weights(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its weights scaled: an oracle that is not the student, so its choice is visible."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)
    return model


def patched_pair(builder, reducer: str, key_weights: bool = True):
    """Two identically patched models, each with its own oracle of the same weights."""
    return [evit_patch.apply_token_reducer(builder(), LAYERS, KEEP, REDUCERS[reducer](other_weights(builder()), key_weights))
            for _ in range(2)]


def kept(model) -> list[torch.Tensor]:
    return [layer.kept_index for layer in evit_patch.kept_tokens(model)]


TIMM_ENTRY_POINTS = {
    "call": lambda model, x: model(x),
    "keyword": lambda model, x: model(x=x),
    "forward_features": lambda model, x: model.forward_head(model.forward_features(x)),
    # the final features are forward_features' (the reduced sequence); the intermediates are on the full grid
    "forward_intermediates": lambda model, x: model.forward_head(model.forward_intermediates(x)[0]),
}


@pytest.mark.parametrize("entry", list(TIMM_ENTRY_POINTS))
@pytest.mark.parametrize("reducer", list(REDUCERS))
def test_timm_entry_points_start_every_forward_afresh(reducer: str, entry: str) -> None:
    model, twin = patched_pair(tiny_vit, reducer)
    target = images(2, 12)
    with torch.no_grad():
        for x in EARLIER:
            TIMM_ENTRY_POINTS[entry](model, x)
            twin(x)
        got = TIMM_ENTRY_POINTS[entry](model, target)
        expected = twin(target)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for ours, theirs in zip(kept(model), kept(twin), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("entry", list(TIMM_ENTRY_POINTS))
@pytest.mark.parametrize("reducer", list(REDUCERS))
def test_an_empty_batch_gives_an_empty_output(reducer: str, entry: str) -> None:
    model, _ = patched_pair(tiny_vit, reducer)
    empty = images(0, 0)
    with torch.no_grad():
        model(images(3, 1))  # state of another batch size must not leak into the empty one
        try:
            expected = TIMM_ENTRY_POINTS[entry](tiny_vit(), empty)
        except RuntimeError:  # timm's own forward_intermediates reshapes with -1, which an empty batch refuses
            with pytest.raises(RuntimeError, match="0 elements"):
                TIMM_ENTRY_POINTS[entry](model, empty)
            return
        got = TIMM_ENTRY_POINTS[entry](model, empty)
    assert got.shape == expected.shape == (0, 5)
    assert [layer.kept_index.shape[0] for layer in evit_patch.kept_tokens(model)] == [0, 0]


transformers = pytest.importorskip("transformers")  # CI installs the extras; a plain install skips
open_clip = pytest.importorskip("open_clip")


def tiny_transformers_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=4, num_labels=5)
    return transformers.ViTForImageClassification(config).eval()


# transformers and open_clip attention takes no key weights: ToMe runs without proportional attention there
LIBRARY_REDUCERS = ["evit", "random", "tome", "oracle"]


@pytest.mark.parametrize("reducer", LIBRARY_REDUCERS)
def test_transformers_keyword_call_starts_afresh(reducer: str) -> None:
    model, twin = patched_pair(tiny_transformers_vit, reducer, key_weights=False)
    target = images(2, 12)
    with torch.no_grad():
        for x in EARLIER:
            model(pixel_values=x)
            twin(x)
        got = model(pixel_values=target).logits
        expected = twin(target).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="0 elements"):  # as transformers' own attention, unpatched, does
        tiny_transformers_vit()(pixel_values=images(0, 0))


def tiny_clip() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.model.CLIP(
        embed_dim=16, vision_cfg=open_clip.model.CLIPVisionCfg(layers=4, width=32, head_width=16, mlp_ratio=2.0,
                                                               patch_size=4, image_size=32),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)).eval()


@pytest.mark.parametrize("reducer", LIBRARY_REDUCERS)
def test_open_clip_encode_image_starts_afresh(reducer: str) -> None:
    clip, clip_twin = tiny_clip(), tiny_clip()
    for model in (clip, clip_twin):
        oracle = other_weights(copy.deepcopy(model.visual))
        evit_patch.apply_token_reducer(model.visual, LAYERS, KEEP, REDUCERS[reducer](oracle, False))
    target = images(2, 12)
    with torch.no_grad():
        for x in EARLIER:
            clip.encode_image(x)
            clip_twin.visual(x)
        got = clip.encode_image(target)
        expected = clip_twin.visual(target)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_keep_rate_is_an_attribute_of_the_patched_model() -> None:
    """``model.keep_rate = r`` takes effect from the next forward, as ``model.r`` does for
    ToMe; ``set_keep_rate`` shows through it; removal takes it away."""
    model = evit_patch.apply_evit(tiny_vit(), LAYERS, 0.5)
    assert model.keep_rate == 0.5

    def counts(x: torch.Tensor) -> list[int]:
        seen: list[int] = []
        hooks = [block.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for block in model.blocks]
        model(x)
        for hook in hooks:
            hook.remove()
        return seen

    assert counts(images(1, 0)) == [65, 1 + 32 + 1, 1 + 17 + 1, 19]
    model.keep_rate = 0.75
    assert counts(images(1, 0)) == [65, 1 + 48 + 1, 1 + 37 + 1, 39]
    evit_patch.set_keep_rate(model, [1.0, 0.5])
    assert model.keep_rate == [1.0, 0.5]
    assert counts(images(1, 0)) == [65, 65, 1 + 32 + 1, 34]
    twin = copy.deepcopy(model)
    twin.keep_rate = 0.25
    assert counts(images(1, 0)) == [65, 65, 34, 34]  # the copy's rate is its own
    model.keep_rate = 1.5
    with pytest.raises(ValueError, match=r"keep_rate must be in \(0, 1\]"):
        model(images(1, 0))
    evit_patch.remove_evit(model)
    assert not hasattr(model, "keep_rate")


@pytest.mark.parametrize("depth, layers", [(12, [3, 6, 9]), (16, [4, 8, 12]), (20, [5, 10, 15]), (24, [6, 12, 18]),
                                           (6, [1, 3, 4]), (4, [1, 2, 3]), (2, [0, 1]), (1, [0])])
def test_layers_omitted_take_the_paper_placement_for_the_depth(depth: int, layers: list[int]) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=16, depth=depth,
                              num_heads=2, num_classes=5).eval()
    evit_patch.apply_evit(model, keep_rate=0.7)
    patched = [index for index, block in enumerate(transformer_blocks(model)) if hasattr(block, "token_reorganizer")]
    assert patched == layers


def test_a_forward_that_stops_before_the_reduction_layers_leaves_no_stale_record() -> None:
    """``forward_intermediates(..., stop_early=True)`` up to block 0 reaches no reduction
    layer: ``kept_tokens`` must not report the earlier forward's tokens as this one's."""
    model, _ = patched_pair(tiny_vit, "evit")
    with torch.no_grad():
        model(images(2, 0))
        model.forward_intermediates(images(3, 1), indices=[0], stop_early=True, intermediates_only=True)
    with pytest.raises(RuntimeError, match="no token record yet"):
        evit_patch.kept_tokens(model)
