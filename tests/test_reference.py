"""apply_evit against the independent eager reference (float64)."""

import pytest
import timm
import torch
from reference_evit import reference_forward

import evit_patch

MODELS = {
    "deit_tiny_patch16_224": {},
    "deit_small_patch16_224": {},
    "deit_tiny_distilled_patch16_224": {},
    "deit3_small_patch16_224": {"img_size": 112},
    "vit_small_patch14_reg4_dinov2": {"img_size": 112, "depth": 6},
    "vit_base_patch16_reg4_gap_256": {"img_size": 128, "depth": 6, "embed_dim": 96, "num_heads": 3},
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, **MODELS[name]).double().eval()
    for block in model.blocks:  # deit3's LayerScale starts near zero; make it matter
        for scale in (block.ls1, block.ls2):
            if hasattr(scale, "gamma"):
                scale.gamma.data.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fuse", [True, False])
def test_patched_model_matches_eager_reference(name: str, fuse: bool) -> None:
    model = _model(name)
    size = model.patch_embed.img_size
    images = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_patched_matches_reference(model, images, fuse)


def assert_patched_matches_reference(model: torch.nn.Module, images: torch.Tensor, fuse: bool) -> None:
    """EViT at keep 0.7 on the DeiT layers (or [1, 3, 4] for a short model): token counts
    after every block and logits equal the eager reference's, in float64."""
    layers = [1, 3, 4] if len(model.blocks) < 10 else [3, 6, 9]
    with torch.no_grad():
        expected, expected_counts = reference_forward(model, images, layers, 0.7, fuse)
        evit_patch.apply_evit(model, layers, 0.7, fuse=fuse)
        counts = []
        for block in model.blocks:
            block.register_forward_hook(lambda m, i, o: counts.append(o.shape[1]))
        actual = model(images)
    assert counts == expected_counts
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_deit_small_token_counts_follow_the_paper() -> None:
    """196 -> 138+1 -> 98+1 -> 70+1 image tokens (plus the class token) at keep 0.7."""
    model = timm.create_model("deit_small_patch16_224").eval()
    assert _image_token_counts(evit_patch.apply_evit(model, [3, 6, 9], 0.7)) == (
        [196] * 3 + [139] * 3 + [99] * 3 + [71] * 3
    )
    evit_patch.apply_evit(evit_patch.remove_evit(model), [3, 6, 9], 0.7, fuse=False)
    assert _image_token_counts(model) == [196] * 3 + [138] * 3 + [97] * 3 + [68] * 3


def _image_token_counts(model: torch.nn.Module) -> list[int]:
    counts = []
    hooks = [block.register_forward_hook(lambda m, i, o: counts.append(o.shape[1] - 1)) for block in model.blocks]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    for hook in hooks:
        hook.remove()
    return counts


def test_non_fused_attention_gives_the_same_reorganization() -> None:
    """With timm's explicit-softmax attention the scores come from its own matrix."""
    model = _model("deit_tiny_patch16_224")
    for block in model.blocks:
        block.attn.fused_attn = False
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, _ = reference_forward(model, images, [3, 6, 9], 0.6, True)
        evit_patch.apply_evit(model, [3, 6, 9], 0.6)
        torch.testing.assert_close(model(images), expected, rtol=1e-9, atol=1e-9)
    assert "softmax" in model.blocks[3].attn.code and "scaled_dot_product" not in model.blocks[3].attn.code
