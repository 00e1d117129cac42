"""LV-ViT: size and cost against the paper, heads on a shortened sequence, test-time prediction."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import evit_patch
import evit_patch.models  # registers lvvit_* with timm
from evit_patch.models import DEFAULT_EVIT_LAYERS, LvVit

SMALL = dict(img_size=32, patch_size=4, num_classes=5, embed_dim=24, depth=4, num_heads=2, stem_chans=8)


def _small(**overrides) -> LvVit:
    torch.manual_seed(0)
    return timm.create_model("lvvit_s", **{**SMALL, **overrides}).eval()


def _parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_lvvit_s_has_the_papers_parameters_and_macs() -> None:
    model = timm.create_model("lvvit_s")
    assert model.patch_embed.num_patches == 14 * 14
    assert _parameters(model) == pytest.approx(26.2e6, rel=0.02)
    assert evit_patch.count_macs(model) == pytest.approx(6.6e9, rel=0.02)


def test_lvvit_m_has_the_papers_parameters() -> None:
    with torch.device("meta"):
        model = timm.create_model("lvvit_m")
    assert (len(model.blocks), model.embed_dim, model.blocks[0].attn.num_heads) == (20, 512, 8)
    assert _parameters(model) == pytest.approx(55.8e6, rel=0.02)


def test_architecture_is_lvvit() -> None:
    model = timm.create_model("lvvit_s")
    block = model.blocks[0]
    assert isinstance(block.attn, timm.layers.Attention) and block.attn.qkv.bias is None
    assert block.mlp.fc1.out_features == 3 * 384 and block.skip_lam == 2
    convs = [m for m in model.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.out_channels) for c in convs] == [
        ((7, 7), (2, 2), 64), ((3, 3), (1, 1), 64), ((3, 3), (1, 1), 64), ((8, 8), (8, 8), 384)]
    assert model.aux_head.weight.shape == model.head.weight.shape == (1000, 384)


def test_residual_branches_are_divided_by_skip_lam() -> None:
    """With the MLP and attention outputs fixed, the block adds exactly branch / skip_lam."""
    block = _small().blocks[0]
    x = torch.randn(2, 7, 24)
    attention_out, mlp_out = torch.randn(2, 7, 24), torch.randn(2, 7, 24)
    block.attn.forward = lambda tokens, **_: attention_out
    block.mlp.forward = lambda tokens: mlp_out
    expected = x + attention_out / 2 + mlp_out / 2
    torch.testing.assert_close(block(x), expected)


def test_eval_prediction_is_cls_plus_half_the_best_token() -> None:
    model = _small()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(images)
        cls_logits = F.linear(tokens[:, 0], model.head.weight, model.head.bias)
        aux_logits = F.linear(tokens[:, 1:], model.aux_head.weight, model.aux_head.bias)
        expected = cls_logits + 0.5 * aux_logits.amax(dim=1)
        torch.testing.assert_close(model(images), expected)
        assert (expected - cls_logits).abs().max() > 1e-3  # the aux term is really there


def test_dense_outputs_for_token_labeling() -> None:
    model = _small()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls_logits, aux_logits = model.forward_dense(images)
        model.return_dense = True
        again = model(images)
    assert cls_logits.shape == (2, 5) and aux_logits.shape == (2, 64, 5)
    torch.testing.assert_close(again, (cls_logits, aux_logits))


def test_heads_run_on_the_tokens_left_after_evit() -> None:
    model = _small()
    evit_patch.apply_evit(model, [1, 2], 0.5)
    images = torch.randn(3, 3, 32, 32)
    left = math.ceil(0.5 * (math.ceil(0.5 * 64) + 1)) + 1  # kept + fused, twice
    with torch.no_grad():
        assert model.forward_features(images).shape == (3, 1 + left, 24)
        cls_logits, aux_logits = model.forward_dense(images)
        prediction = model(images)
    assert aux_logits.shape == (3, left, 5)
    torch.testing.assert_close(prediction, cls_logits + 0.5 * aux_logits.amax(dim=1))


@pytest.mark.parametrize("name", sorted(DEFAULT_EVIT_LAYERS))
def test_default_layers_patch_every_variant(name: str) -> None:
    model = timm.create_model(name, img_size=64)
    layers = DEFAULT_EVIT_LAYERS[name]
    assert all(0 < layer < len(model.blocks) for layer in layers)
    evit_patch.apply_evit(model, layers, 0.7)
    assert all(type(model.blocks[layer]).__name__ == "ReorganizingLvvitBlock" for layer in layers)


def test_lvvit_s_with_evit_costs_what_the_paper_reports() -> None:
    model = timm.create_model("lvvit_s")
    evit_patch.apply_evit(model, DEFAULT_EVIT_LAYERS["lvvit_s"], 0.7)
    assert evit_patch.count_macs(model) == pytest.approx(4.7e9, rel=0.03)
