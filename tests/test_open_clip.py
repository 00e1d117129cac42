"""The one-line patch on open_clip's VisionTransformer, the image tower of CLIP models,
built from small configs with random weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference_evit import kept_count
from reference_families import open_clip_reference

import evit_patch
from evit_patch.core.model_info import transformer_blocks

open_clip = pytest.importorskip("open_clip")  # CI installs the extra; a plain install skips

LAYERS = [1, 2]
TOWER = {"layers": 4, "width": 48, "head_width": 16, "mlp_ratio": 2.0, "patch_size": 8, "image_size": 32}


def clip_model(dtype=torch.float64, **vision) -> torch.nn.Module:
    """A tiny CLIP: the image tower under test and a one-layer text tower."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=16, vision_cfg=open_clip.model.CLIPVisionCfg(**{**TOWER, **vision}),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
    return model.to(dtype).eval()


def images(dtype=torch.float64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype)


def counted(visual, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    counts: list[int] = []
    hooks = [block.register_forward_hook(lambda m, i, o: counts.append(o.shape[1]))
             for block in transformer_blocks(visual)]
    result = visual(x)
    for hook in hooks:
        hook.remove()
    return result, counts


@pytest.mark.parametrize("keep_rate", [0.7, 0.5])
@pytest.mark.parametrize("fuse", [True, False])
def test_clip_image_embedding_matches_the_eager_reference(keep_rate: float, fuse: bool) -> None:
    """The image tower of a CLIP model patched: its normalized image embedding and the
    token count after every block equal the float64 reference's."""
    model, x = clip_model(ls_init_value=0.5), images()
    with torch.no_grad():
        expected, expected_counts = open_clip_reference(model.visual, x, LAYERS, keep_rate, fuse)
        evit_patch.apply_evit(model.visual, LAYERS, keep_rate, fuse=fuse)
        embedding = model.encode_image(x, normalize=True)
        _, counts = counted(model.visual, x)
    n = 16
    for index in range(4):
        if index in LAYERS:
            keep = kept_count(n, keep_rate)
            n = keep + (1 if fuse and keep < n else 0)
        assert counts[index] == 1 + n
    assert counts == expected_counts
    torch.testing.assert_close(embedding, F.normalize(expected, dim=-1), rtol=1e-9, atol=1e-9)


def test_average_pooled_tower_matches_the_reference() -> None:
    """With ``pool_type='avg'`` the fused token is averaged with the kept ones."""
    visual, x = clip_model(pool_type="avg").visual, images()
    with torch.no_grad():
        expected, _ = open_clip_reference(visual, x, LAYERS, 0.5, True)
        evit_patch.apply_evit(visual, LAYERS, 0.5)
        torch.testing.assert_close(visual(x), expected, rtol=1e-9, atol=1e-9)


def test_gradients_match_the_reference() -> None:
    visual, reference_visual, x = clip_model().visual, clip_model().visual, images()
    expected, _ = open_clip_reference(reference_visual, x, LAYERS, 0.5, True)
    expected.square().sum().backward()
    evit_patch.apply_evit(visual, LAYERS, 0.5)
    visual(x).square().sum().backward()
    mine = dict(visual.named_parameters())
    for key, parameter in reference_visual.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(mine[key].grad, parameter.grad, rtol=1e-8, atol=1e-10, msg=key)


@pytest.mark.parametrize("vision", [{}, {"qk_norm": True}])
def test_keep_rate_one_is_the_identity_and_removal_is_exact(vision: dict) -> None:
    """Default blocks (nn.MultiheadAttention) and open_clip's custom blocks (its own
    Attention, with q/k norm): bitwise the unpatched tower at keep 1.0 and after removal,
    state_dict keys, order and values unchanged, tokens really dropped at keep 0.5."""
    visual, x = clip_model(torch.float32, **vision).visual, images(torch.float32)
    before = {key: value.clone() for key, value in visual.state_dict().items()}
    originals = list(transformer_blocks(visual))
    with torch.no_grad():
        expected = visual(x)
        evit_patch.apply_evit(visual, LAYERS, 1.0)
        assert list(visual.state_dict()) == list(before)
        assert all(torch.equal(value, before[key]) for key, value in visual.state_dict().items())
        assert torch.equal(visual(x), expected)
        evit_patch.set_keep_rate(visual, 0.5)
        assert counted(visual, x)[1] == [17, 10, 7, 7]  # 16 -> 8 + fused -> 5 + fused image tokens
        evit_patch.remove_evit(visual)
        assert all(a is b for a, b in zip(transformer_blocks(visual), originals))
        assert torch.equal(visual(x), expected)


def test_a_whole_clip_model_is_refused_untouched() -> None:
    model = clip_model(torch.float32)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"apply_evit\(model.visual"):
        evit_patch.apply_evit(model, LAYERS, 0.5)
    assert not evit_patch.is_patched(model) and not evit_patch.is_patched(model.visual)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_a_mask_is_refused() -> None:
    visual, x = clip_model(torch.float32).visual, images(torch.float32)
    evit_patch.apply_evit(visual, LAYERS, 0.5)
    tokens = visual._embeds(x)
    with pytest.raises(ValueError, match="attn_mask"):
        visual.transformer(tokens, attn_mask=torch.zeros(17, 17))


@pytest.mark.parametrize("keep_rate, fuse", [(1.0, True), (0.7, True), (0.5, False)])
def test_count_macs_is_the_cost_of_the_tokens_really_run(keep_rate: float, fuse: bool) -> None:
    """Patch embedding, per block qkv / attention / output / MLP and two layer norms on the
    tokens each part runs on, ln_pre, ln_post and the projection; a reorganizing layer
    adds the class token's query and the keys projected for its scores (projected whether
    tokens are dropped or not: nn.MultiheadAttention runs as itself), and one that drops
    tokens the class attention row and the fused token's weighted sum."""
    dim, hidden, patches = 48, 96, 16
    total, n = patches * 8 * 8 * 3 * dim + 2 * 5 * (1 + patches) * dim + dim * 16, patches
    for index in range(4):
        tokens_in = 1 + n
        if index in LAYERS:
            total += (1 + tokens_in) * dim * dim
        if index in LAYERS and kept_count(n, keep_rate) < n:
            total += tokens_in * dim + (n * dim if fuse else 0)
            n = kept_count(n, keep_rate) + (1 if fuse else 0)
        total += tokens_in * dim * 4 * dim + 2 * tokens_in * tokens_in * dim + 5 * tokens_in * dim
        total += 2 * (1 + n) * dim * hidden + 5 * (1 + n) * dim
    if n != patches:
        total -= 5 * (patches - n) * dim  # ln_post runs on the tokens left
    visual = clip_model(torch.float32).visual
    evit_patch.apply_evit(visual, LAYERS, keep_rate, fuse=fuse)
    assert evit_patch.count_macs(visual) == total


def test_gradient_checkpointing_runs_the_patched_blocks() -> None:
    """open_clip checkpoints each block with ``(x, None, None, attn_mask)`` by position."""
    visual, x = clip_model().visual, images()
    expected, _ = open_clip_reference(visual, x, LAYERS, 0.5, True)
    evit_patch.apply_evit(visual, LAYERS, 0.5)
    visual.set_grad_checkpointing(True)
    visual.train()
    torch.testing.assert_close(visual(x), expected, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="k_x"):
        transformer_blocks(visual)[1](visual._embeds(x), visual._embeds(x))
