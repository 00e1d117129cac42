"""Training through EViT: loss and every parameter's gradient equal the eager reference's.

Both run in train mode (dropout and drop-path at 0, so the forward is deterministic) in
float64 with autograd. The fused token's weights are the class-attention scores and
carry gradient back into q and k, as in the paper's code: a patch that detached them,
renormalized them or ranked tokens differently would change some gradient here.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from reference_evit import _attention, _layer_norm, reference_forward
from torch import Tensor, nn

import evit_patch

LAYERS = [1, 2, 3]
KEEP_RATE = 0.7
TINY = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 3, "num_classes": 10,
        "drop_rate": 0.0, "proj_drop_rate": 0.0, "attn_drop_rate": 0.0, "drop_path_rate": 0.0}
PEAKED_QKV_SCALE = 6.0  # q and k x6, logits x36: attention far from uniform, the cut decisive


def _model(peaked: bool, fused_attention: bool, class_token: bool = True) -> nn.Module:
    torch.manual_seed(0)
    kwargs = TINY if class_token else {**TINY, "class_token": False, "global_pool": "avg"}
    model = timm.create_model("deit_tiny_patch16_224", **kwargs).double().train()
    for block in model.blocks:
        block.attn.fused_attn = fused_attention
        if peaked:
            block.attn.qkv.weight.data.mul_(PEAKED_QKV_SCALE)
    return model


def _batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=generator)
    return images, torch.tensor([3, 8])


def _score_spread(model: nn.Module, images: Tensor) -> float:
    """Largest over smallest class-attention score of the image tokens in the first block."""
    block = model.blocks[0]
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        _, matrix = _attention(_layer_norm(x, block.norm1), block.attn)
    scores = matrix[:, :, 0, model.num_prefix_tokens:].mean(dim=1)
    return float((scores.max(dim=1).values / scores.min(dim=1).values).min())


def _assert_same_training_step(model: nn.Module, fuse: bool) -> None:
    """Patch ``model`` and compare one forward/backward with the reference's on a copy."""
    reference = copy.deepcopy(model)
    images, labels = _batch()
    expected_logits, _ = reference_forward(reference, images, LAYERS, KEEP_RATE, fuse)
    expected_loss = F.cross_entropy(expected_logits, labels)
    expected_loss.backward()

    evit_patch.apply_evit(model, LAYERS, KEEP_RATE, fuse=fuse)
    assert model.training
    loss = F.cross_entropy(model(images), labels)
    loss.backward()

    torch.testing.assert_close(loss, expected_loss, rtol=1e-9, atol=0)
    expected = dict(reference.named_parameters())
    actual = dict(model.named_parameters())
    assert actual.keys() == expected.keys()
    for name, parameter in expected.items():
        assert parameter.grad is not None and actual[name].grad is not None, name
        scale = parameter.grad.abs().max()
        assert scale > 0, name
        error = (actual[name].grad - parameter.grad).abs().max() / scale
        assert error <= 1e-9, f"{name}: gradient differs from the reference by {float(error):.3g} (relative)"


@pytest.mark.parametrize("fuse", [True, False], ids=["fusion", "no-fusion"])
@pytest.mark.parametrize("fused_attention", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("peaked", [True, False], ids=["peaked", "timm-init"])
def test_loss_and_every_gradient_match_the_reference(peaked: bool, fused_attention: bool, fuse: bool) -> None:
    model = _model(peaked, fused_attention)
    spread = _score_spread(model, _batch()[0])
    if peaked:  # far from uniform: the cut separates tokens the model really tells apart
        assert spread > 5, spread
    else:  # timm's small initial weights: nearly uniform attention, the cut decided by small differences
        assert spread < 1.5, spread
    _assert_same_training_step(model, fuse)
    code = model.blocks[LAYERS[0]].attn.code
    assert ("scaled_dot_product_attention" in code) == fused_attention


def test_gradients_of_a_model_without_class_token_match_the_reference() -> None:
    """Global-pool models score a token by the attention it receives from every query."""
    _assert_same_training_step(_model(peaked=True, fused_attention=True, class_token=False), fuse=True)

