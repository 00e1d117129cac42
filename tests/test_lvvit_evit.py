"""apply_evit on LV-ViT against an eager LV-ViT written out here (float64)."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from reference_evit import reorganize_sample

import evit_patch
import evit_patch.models  # registers lvvit_* with timm

SKIP_LAM = 2.0  # LV-ViT-S/M divide both residual branches by 2
AUX_WEIGHT = 0.5  # test-time prediction: cls + 0.5 * max over tokens of aux


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _attention(x: torch.Tensor, attn: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head self-attention with qkv without bias; returns output and the (B, H, N, N) matrix."""
    batch, tokens, width = x.shape
    heads = attn.num_heads
    q, k, v = (x @ attn.qkv.weight.T).reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    matrix = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(width // heads), dim=-1)
    out = (matrix @ v).transpose(1, 2).reshape(batch, tokens, width)
    return out @ attn.proj.weight.T + attn.proj.bias, matrix


def _mlp(x: torch.Tensor, mlp: torch.nn.Module) -> torch.Tensor:
    hidden = x @ mlp.fc1.weight.T + mlp.fc1.bias
    hidden = hidden / 2 * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    return hidden @ mlp.fc2.weight.T + mlp.fc2.bias


def reference_lvvit(model, images, layers, keep_rate, fuse) -> tuple[torch.Tensor, list[int]]:
    """EViT-LV-ViT prediction and the image-token count after each block."""
    x = model.patch_embed(images)
    x = torch.cat([model.cls_token.expand(len(x), -1, -1), x], dim=1) + model.pos_embed
    counts = []
    for index, block in enumerate(model.blocks):
        out, attention = _attention(_layer_norm(x, block.norm1), block.attn)
        x = x + out / SKIP_LAM
        if index in layers:
            x = torch.stack([reorganize_sample(x[b], attention[b], 1, keep_rate, fuse) for b in range(len(x))])
        x = x + _mlp(_layer_norm(x, block.norm2), block.mlp) / SKIP_LAM
        counts.append(x.shape[1] - 1)
    x = _layer_norm(x, model.norm)
    cls_logits = x[:, 0] @ model.head.weight.T + model.head.bias
    aux_logits = x[:, 1:] @ model.aux_head.weight.T + model.aux_head.bias
    return cls_logits + AUX_WEIGHT * aux_logits.max(dim=1).values, counts


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("lvvit_s", img_size=64, patch_size=8, num_classes=7, embed_dim=48, depth=6,
                              num_heads=4, stem_chans=16).double().eval()
    with torch.no_grad():  # wider weights than the init: attention that prefers some tokens
        for block in model.blocks:
            block.attn.qkv.weight.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("fused_attention", [True, False])
def test_patched_lvvit_matches_eager_reference(fuse: bool, fused_attention: bool) -> None:
    model = _model()
    for block in model.blocks:
        block.attn.fused_attn = fused_attention
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layers = [1, 3, 4]
    with torch.no_grad():
        expected, expected_counts = reference_lvvit(model, images, layers, 0.7, fuse)
        unpatched = model(images)
        evit_patch.apply_evit(model, layers, 0.7, fuse=fuse)
        counts = []
        hooks = [block.register_forward_hook(lambda module, args, out: counts.append(out.shape[1] - 1))
                 for block in model.blocks]
        actual = model(images)
    for hook in hooks:
        hook.remove()
    assert counts == expected_counts and counts[-1] < 64
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)
    assert (actual - unpatched).abs().max() > 1e-6  # tokens were really reorganized


def test_reference_without_reorganization_is_the_model() -> None:
    """The eager LV-ViT above is the model itself when no layer reorganizes."""
    model = _model()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected, counts = reference_lvvit(model, images, [], 1.0, True)
        torch.testing.assert_close(model(images), expected, rtol=1e-9, atol=1e-9)
    assert counts == [64] * 6
