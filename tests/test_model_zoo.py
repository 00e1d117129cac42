"""One model of every family apply_evit accepts against the independent eager reference
(float64): logits, token counts, the reorganized tokens and the kept tokens in order.

The prefix count each family's blocks really see is read off the model's own forward (a
hook on the first block's input, less the patch grid), never from evit_patch; the
scores are the class token's attention row when the blocks hold a class token, else
the attention each token receives (GAP/MAP heads, and CaiT, whose class token only
joins after ``blocks``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import timm
import torch
from reference_evit import (
    _attention,
    _layer_norm,
    _layer_scale,
    _mlp,
    kept_count,
    reference_forward_zoo,
    scores_and_order,
)
from test_reference import MODELS as DEIT_MODELS
from test_reference import _model as deit_model
from test_reference import assert_patched_matches_reference
from torch import nn

import evit_patch


@dataclass(frozen=True)
class Family:
    model: str
    prefix: int  # tokens before the patches in the sequence the blocks see
    class_token: bool  # the first of them is a class token whose attention row scores
    build: dict = field(default_factory=dict)


SMALL = {"depth": 3, "embed_dim": 64, "num_heads": 4}
FAMILIES = {
    "deit": Family("deit_tiny_patch16_224", 1, True, {**SMALL, "img_size": 64}),
    "deit distilled": Family("deit_tiny_distilled_patch16_224", 2, True, {**SMALL, "img_size": 64}),
    "deit3 (LayerScale)": Family("deit3_small_patch16_224", 1, True, {**SMALL, "img_size": 64}),
    "vit": Family("vit_tiny_patch16_224", 1, True, {**SMALL, "img_size": 64}),
    "vit registers (dinov2)": Family("vit_small_patch14_reg4_dinov2", 5, True, {**SMALL, "img_size": 56}),
    "vit registers, GAP": Family("vit_medium_patch16_reg4_gap_256", 4, False, {**SMALL, "img_size": 64}),
    "vit GAP, no class token": Family("vit_base_patch16_gap_224", 0, False, {**SMALL, "img_size": 64}),
    "vit MAP head (siglip)": Family("vit_base_patch16_siglip_224", 0, False, {**SMALL, "img_size": 64}),
    "vit post-norm (ResPostBlock)": Family("vit_base_patch16_rpn_224", 0, False, {**SMALL, "img_size": 64}),
    "vit hybrid (ResNet stem)": Family("vit_tiny_r_s16_p8_224", 1, True, {**SMALL, "img_size": 64}),
    "vit radio (8 prefix tokens)": Family("vit_base_patch16_radio_v3", 8, True, {**SMALL, "img_size": 64}),
    "flexivit": Family("flexivit_small", 1, True, {**SMALL, "img_size": 64}),
    "eva (plain ViT blocks)": Family("eva_large_patch14_196", 1, True, {**SMALL, "img_size": 56}),
    "beit3 (attention norm)": Family("beit3_base_patch16_224", 1, True, {**SMALL, "img_size": 64}),
    "aimv2 (RMSNorm, SwiGLU)": Family("aimv2_large_patch14_224", 0, False, {**SMALL, "img_size": 56}),
    "vitamin (conv stem, GeGLU)": Family("vitamin_small_224", 0, False, {"depth": 3, "img_size": 64}),
    "naflexvit, GAP": Family("naflexvit_base_patch16_gap", 4, False, {**SMALL, "img_size": 64}),
    "naflexvit radio": Family("naflexvit_base_patch16_radio_v3", 8, True, {**SMALL, "img_size": 64}),
    "cait (talking heads, class token after the blocks)": Family("cait_xxs24_224", 0, False,
                                                                 {**SMALL, "img_size": 64}),
}
LAYERS = [1, 2]


def peak(model: nn.Module, factor: float) -> None:
    """Multiply every query and key projection by ``factor``: logits grow by its square,
    so attention concentrates on few tokens and the cut between kept and fused is decisive."""
    for block in model.blocks:
        weight, bias = block.attn.qkv.weight, block.attn.qkv.bias
        width = weight.shape[0] // 3
        weight.data[: 2 * width] *= factor
        if bias is not None:
            bias.data[: 2 * width] *= factor


def _to_float32(module: nn.Module, args: tuple) -> tuple:
    return tuple(arg.float() for arg in args)


def _to_float64(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.double()


def family_model(family: Family) -> nn.Module:
    """The family's model in float64, but for a convolutional stem kept in float32 (float64
    convolutions are slow on CPU): patched model and reference read the same stem output."""
    torch.manual_seed(0)
    model = timm.create_model(family.model, **family.build).double().eval()
    stem = getattr(model, "patch_embed", None)
    if stem is not None and type(stem).__name__ == "HybridEmbed":
        stem.float().register_forward_pre_hook(_to_float32)
        stem.register_forward_hook(_to_float64)
    for parameter_name, parameter in model.named_parameters():  # LayerScale and talking heads start small
        if parameter_name.split(".")[-1] in ("gamma", "gamma_1", "gamma_2"):
            parameter.data.uniform_(0.5, 1.5)
    return model


def image_size(model: nn.Module) -> tuple[int, int]:
    embed = getattr(model, "patch_embed", None)
    return tuple(embed.img_size) if embed is not None else (64, 64)


def patch_grid(model: nn.Module, size: tuple[int, int]) -> int:
    """Patches an image of ``size`` makes, from timm's own patch embedding."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None:
        return math.prod(embed.grid_size)
    patch = model.embeds.patch_size
    return (size[0] // patch[0]) * (size[1] // patch[1])


def sequence_lengths(model: nn.Module, images: torch.Tensor) -> list[int]:
    """Length of the sequence entering each block."""
    lengths: list[int] = []
    hooks = [block.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
             for block in model.blocks]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return lengths


def images_for(model: nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *image_size(model), dtype=torch.float64, generator=generator)


WITHOUT_FUSION = ["deit distilled", "vit registers, GAP", "cait (talking heads, class token after the blocks)"]


@pytest.mark.parametrize(("family", "fuse"),
                         [(name, True) for name in FAMILIES] + [(name, False) for name in WITHOUT_FUSION])
def test_family_matches_the_eager_reference(family: str, fuse: bool) -> None:
    spec = FAMILIES[family]
    model = family_model(spec)
    peak(model, 2.0)
    images = images_for(model)
    grid = patch_grid(model, image_size(model))
    assert sequence_lengths(model, images)[0] - grid == spec.prefix  # what the blocks really see
    with torch.no_grad():
        unpatched = model(images)
        same, _, _, _ = reference_forward_zoo(model, images, [], 1.0, fuse, spec.prefix, spec.class_token)
        torch.testing.assert_close(same, unpatched, rtol=1e-9, atol=1e-9)  # the reference is the model
        expected, expected_counts, expected_tokens, expected_kept = reference_forward_zoo(
            model, images, LAYERS, 0.6, fuse, spec.prefix, spec.class_token)
        evit_patch.apply_evit(model, LAYERS, 0.6, fuse=fuse)
        reorganized = {}
        for index in LAYERS:
            model.blocks[index].token_reorganizer.register_forward_hook(
                lambda m, i, o, index=index: reorganized.__setitem__(index, o))
        counts = []
        for block in model.blocks:
            block.register_forward_hook(lambda m, i, o: counts.append(o.shape[1]))
        actual = model(images)
    assert counts == expected_counts
    for index, layer in zip(LAYERS, evit_patch.kept_tokens(model)):
        assert layer.kept_index.tolist() == expected_kept[index]  # the kept tokens, highest score first
        torch.testing.assert_close(reorganized[index], expected_tokens[index], rtol=1e-9, atol=1e-9)
    assert evit_patch.kept_tokens(model)[0].token_of_patch.shape[1] == grid  # every patch is an image token
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def kept_score_mass(model: nn.Module, images: torch.Tensor, layer: int, keep_rate: float) -> float:
    """Smallest share of the class-attention mass the kept tokens hold at ``layer`` (eager):
    about ``keep_rate`` when attention is flat, near 1 when it is peaked."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    for block in model.blocks[:layer]:
        x = x + _layer_scale(_attention(_layer_norm(x, block.norm1), block.attn)[0], block.ls1)
        x = x + _layer_scale(_mlp(_layer_norm(x, block.norm2), block.mlp), block.ls2)
    _, attention = _attention(_layer_norm(x, model.blocks[layer].norm1), model.blocks[layer].attn)
    shares = []
    for sample in attention:
        scores, order = scores_and_order(sample, model.num_prefix_tokens, True)
        shares.append(float(scores[order[:kept_count(len(order), keep_rate)]].sum() / scores.sum()))
    return min(shares)


@pytest.mark.parametrize(("name", "fuse"), [(name, True) for name in DEIT_MODELS] + [("deit_tiny_patch16_224", False)])
def test_deit_reference_at_peaked_attention(name: str, fuse: bool) -> None:
    """The DeiT reference comparison where attention is peaked: a wrong score (head max,
    no softmax, the wrong row) moves tokens across the cut instead of nudging a tie."""
    model = deit_model(name)
    peak(model, 3.0)
    images = torch.randn(2, 3, *model.patch_embed.img_size, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(1))
    layers = [1, 3, 4] if len(model.blocks) < 10 else [3, 6, 9]
    if model.cls_token is not None:  # mean-received scores stay flat however peaked the rows are
        with torch.no_grad():
            assert kept_score_mass(model, images, layers[0], 0.7) > 0.8
    assert_patched_matches_reference(model, images, fuse)


def test_kept_tokens_come_out_highest_score_first() -> None:
    """The order itself, read off the tokens after the reorganizing block: the i-th kept
    token is the image token of i-th highest class attention (an independent argsort of
    the eager scores), and the fused token comes last."""
    model = family_model(FAMILIES["deit"])
    peak(model, 2.0)
    images = images_for(model, batch=3, seed=4)
    block_index = 1
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        x = model.blocks[0](x)
        block = model.blocks[block_index]
        out, attention = _attention(_layer_norm(x, block.norm1), block.attn)
        after_attention = x + _layer_scale(out, block.ls1)
        scores = attention[:, :, 0, 1:].mean(dim=1)
        evit_patch.apply_evit(model, [block_index], 0.5)
        seen = {}
        model.blocks[block_index].token_reorganizer.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
        model(images)
    order = scores.argsort(dim=1, descending=True)
    keep = math.ceil(0.5 * scores.shape[1])
    assert torch.equal(evit_patch.kept_tokens(model)[0].kept_index, order[:, :keep])
    assert torch.all(scores.gather(1, order[:, :keep]).diff(dim=1) < 0)  # strictly descending, no ties here
    image_tokens = after_attention[:, 1:]
    expected_kept = image_tokens.gather(1, order[:, :keep, None].expand(-1, -1, image_tokens.shape[-1]))
    torch.testing.assert_close(seen["x"][:, 1:1 + keep], expected_kept, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seen["x"][:, 0], after_attention[:, 0], rtol=1e-12, atol=1e-12)  # class token as is
    fused = (scores.gather(1, order[:, keep:]).unsqueeze(-1)
             * image_tokens.gather(1, order[:, keep:, None].expand(-1, -1, image_tokens.shape[-1]))).sum(1)
    torch.testing.assert_close(seen["x"][:, -1], fused, rtol=1e-12, atol=1e-12)


def test_cait_keeps_the_papers_counts_and_can_drop_every_patch() -> None:
    """The issue's example: cait_xxs24_224 at layers 3, 6, 9 and keep 0.7 keeps 138, 98 and
    70 of 196 patch tokens (ceil(0.7 n) of the tokens its self-attention blocks hold, with
    no class token among them); and patch 0 is an ordinary token that can be fused."""
    torch.manual_seed(0)
    model = timm.create_model("cait_xxs24_224", depth=10).eval()  # blocks past the last layer cost time only
    evit_patch.apply_evit(model, [3, 6, 9], 0.7)
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    layers = evit_patch.kept_tokens(model)
    assert [layer.kept_index.shape[1] for layer in layers] == [138, 98, 70]
    assert layers[0].token_of_patch.shape[1] == 196
    assert (layers[-1].status[:, 0] != evit_patch.KEPT).any()


def test_dynamicvit_refuses_cait_for_its_late_class_token() -> None:
    from evit_patch.dynamicvit import apply_dynamicvit

    model = family_model(FAMILIES["cait (talking heads, class token after the blocks)"])
    with pytest.raises(evit_patch.UnsupportedModelError, match="class token joins only after `blocks`"):
        apply_dynamicvit(model, [1], 0.7)


def test_a_prefix_count_the_blocks_do_not_see_is_refused() -> None:
    """A model whose num_prefix_tokens disagrees with the sequence its blocks see (here a
    DeiT claiming a second prefix token) is refused at patch time and left unpatched,
    instead of scoring and fusing the wrong tokens."""
    model = family_model(FAMILIES["deit"])
    model.num_prefix_tokens = 2
    with pytest.raises(evit_patch.UnsupportedModelError, match=r"blocks see \[17\] tokens, not its 16 patches plus 2"):
        evit_patch.apply_evit(model, [1], 0.5)
    assert not evit_patch.is_patched(model)
    assert not any(type(block).__name__.startswith("Reorganizing") for block in model.blocks)


class _WeightsUsedTwice(nn.Module):
    """Heads mixed after the softmax, the mixed weights then read by two computations."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj_w, self.proj = nn.Linear(8, 24), nn.Linear(2, 2), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, 2, width // 2).permute(2, 0, 3, 1, 4)
        mixed = self.proj_w((q @ k.transpose(-2, -1)).softmax(dim=-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        out = mixed @ v + mixed.sum(dim=-1, keepdim=True) * v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


def test_attention_whose_mixed_weights_feed_two_results_is_refused() -> None:
    """Which post-softmax weights the tokens receive must be clear, or there is no score."""
    from evit_patch.core.scored_attention import scored_attention

    with pytest.raises(evit_patch.UnsupportedModelError, match="weights the values receive cannot be told"):
        scored_attention(_WeightsUsedTwice(), "two-way")
