"""Every ViT-like model in timm's registry either patches and reorganizes exactly the
tokens its blocks hold, or is refused with UnsupportedModelError for its family's own
reason, never any other exception. Accepted models are built small (2 blocks, narrow,
112 px where the entrypoint allows) so the whole registry runs in CI, none skipped;
refused ones are only built on the meta device.

The prefix count is read off each model's own forward (the first block's input less the
patch grid), not from evit_patch, and ``EXPECTED`` states for every family whether it is
accepted and, if not, why: a family that starts being refused, or one accepted with
the wrong prefix (CaiT's class token counted although it joins after ``blocks``), fails.
"""

from __future__ import annotations

import math
import re

import pytest
import timm
import torch

import evit_patch
from evit_patch import UnsupportedModelError

VIT_LIKE = ["vit_*", "deit*", "flexivit*", "eva*", "beit*", "cait*", "xcit*", "levit*", "volo*",
            "aimv2*", "naflexvit*", "vitamin*", "test_vit*"]
OTHER_TRANSFORMERS = ["convit_tiny", "tnt_s_patch16_224", "pit_ti_224", "mvitv2_tiny", "twins_svt_small",
                      "crossvit_tiny_240", "nest_tiny", "gcvit_xxtiny", "efficientformer_l1", "sequencer2d_s",
                      "hiera_tiny_224", "qwen3_vit_88m_enc", "gemma4_vit_167m_enc", "deepseek_vit_412m_enc"]
ROTARY_FAMILIES = r"^(eva|vit_pe_)|_rope_|dinov3|sapiens2|lingbot"
BIAS_FAMILIES = r"^beit_|^beitv2_|relpos"
GRID_AFTER_BLOCKS = "reads the blocks' output as the full patch grid"
NO_ATTENTION = "has no `attn` submodule"
NO_BLOCKS = "no `blocks` sequence of transformer blocks"
NO_PREFIX_COUNT = "no integer `num_prefix_tokens`"
EXPECTED = [  # (name pattern, None when accepted else what the refusal must say); the first match decides
    (r"^eva_large_patch14_(196|336)", None),  # plain ViT blocks under an EVA name
    (r"^(qwen3|deepseek)_vit", GRID_AFTER_BLOCKS),  # vision-language towers: a patch merger reads the grid
    (r"^gemma4_vit_\w+_enc$", GRID_AFTER_BLOCKS),  # built with the soft-token pooler, which bins the full grid
    (r"^gemma4_vit", None),  # the classifiers: rope_cos/rope_sin follow the kept tokens (test_gemma4_positions.py)
    (ROTARY_FAMILIES, None),  # rotary tables follow the kept tokens
    (BIAS_FAMILIES, None),  # a relative position bias follows the kept tokens
    (r"^xcit_", "the patch grid's height and width"),
    (r"^(levit|volo|pit|mvitv2|nest|gcvit|efficientformer|sequencer2d)_", NO_BLOCKS),
    (r"_xp_|_18x2_|^vit_d?pwee_", NO_ATTENTION),  # parallel attention/MLP blocks
    (r"^vit_d(little|wee)_", "does not compute one softmax attention"),  # differential attention
    (r"^convit_", "GPSA cannot be traced"),
    (r"^tnt_", NO_ATTENTION),  # inner and outer attention
    (r"^(twins|crossvit|hiera)_", NO_PREFIX_COUNT),
    (r"^(vit|deit|deit3|flexivit|cait|aimv2|naflexvit|vitamin|beit3)_|^test_vit\d*$", None),
]
MUST_BE_ACCEPTED = ["eva02_base_patch14_224", "vit_base_patch16_dinov3", "vit_pe_core_base_patch16_224",
                    "vit_base_patch16_rope_mixed_224", "eva_giant_patch14_224",
                    "deit_tiny_patch16_224", "deit_small_distilled_patch16_224", "deit3_small_patch16_224",
                    "vit_small_patch14_reg4_dinov2", "vit_base_patch16_reg4_gap_256", "vit_base_patch16_siglip_224",
                    "vit_base_r50_s16_224", "flexivit_small", "cait_xxs24_224", "naflexvit_base_patch16_gap"]
SMALL_BUILDS = [
    {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 112},
    {"depth": 2, "embed_dim": 96, "num_heads": 3, "img_size": 112},  # SwiGLU MLPs (giant) need an even hidden width
    {"depth": 2, "embed_dim": 64, "num_heads": 2, "num_kv_heads": 1, "img_size": 112},  # grouped-query (sapiens2)
    {"depth": 2, "img_size": 112},
    {"depth": 2},
    {},  # families whose entrypoints fix their depth (levit, xcit, volo, cait): the smallest ones
]
MAX_PARAMETERS = 40_000_000  # the largest depth-2 build (vitamin_xlarge, whose stem fixes the width) is 37.4M
KEEP_RATE = 0.6


def expected_reason(name: str) -> str | None:
    for pattern, reason in EXPECTED:
        if re.search(pattern, name):
            return reason
    raise AssertionError(f"{name}: no family in EXPECTED; say whether it is accepted")


def build_small(name: str) -> torch.nn.Module:
    for kwargs in SMALL_BUILDS:
        try:
            with torch.device("meta"):  # size it without allocating
                sized = timm.create_model(name, **kwargs)
        except Exception:  # this size is not one the entrypoint accepts; try the next
            continue
        if sum(p.numel() for p in sized.parameters()) <= MAX_PARAMETERS:
            return timm.create_model(name, **kwargs).eval()
    pytest.fail(f"{name} cannot be built with at most {MAX_PARAMETERS:,} parameters by any of SMALL_BUILDS; "
                "add a size it accepts (an accepted model is never skipped)")


def input_size(model: torch.nn.Module) -> tuple[int, int]:
    embed = getattr(model, "patch_embed", None)
    return tuple(embed.img_size) if embed is not None else (112, 112)


def patch_grid(model: torch.nn.Module, size: tuple[int, int]) -> int:
    """Patches an image of ``size`` makes, from timm's own patch embedding."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None:
        return math.prod(embed.grid_size)
    patch = model.embeds.patch_size  # NaFlexVit
    return (size[0] // patch[0]) * (size[1] // patch[1])


def test_the_main_families_are_expected_to_patch() -> None:
    registry = set(timm.list_models(VIT_LIKE))
    for name in MUST_BE_ACCEPTED:
        assert name in registry and expected_reason(name) is None


@pytest.mark.parametrize("name", OTHER_TRANSFORMERS)
def test_other_transformers_are_refused_for_their_reason(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    with pytest.raises(UnsupportedModelError) as refusal:
        evit_patch.apply_evit(model, [1], KEEP_RATE)
    assert expected_reason(name) in refusal.value.reason
    assert not evit_patch.is_patched(model)


@pytest.mark.parametrize("name", timm.list_models(VIT_LIKE))
def test_registry_model_reorganizes_the_tokens_its_blocks_hold_or_is_refused(name: str) -> None:
    reason = expected_reason(name)
    if reason is not None:  # refusals are decided before any forward: the model need not be real or small
        with torch.device("meta"):
            model = timm.create_model(name)
        with pytest.raises(UnsupportedModelError) as refusal:
            evit_patch.apply_evit(model, [0, 1], KEEP_RATE)
        assert reason in refusal.value.reason
        assert not evit_patch.is_patched(model)
        return
    torch.manual_seed(0)
    model = build_small(name)
    evit_patch.apply_evit(model, [0, 1], KEEP_RATE)
    lengths: list[int] = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    outputs: list[int] = []
    for block in model.blocks[:2]:
        block.register_forward_hook(lambda m, i, o: outputs.append(o.shape[1]))
    size = input_size(model)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size))
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    grid = patch_grid(model, size)
    prefix = lengths[0] - grid  # the tokens before the patches that the blocks really hold
    image_tokens, expected = grid, []
    for _ in range(2):
        kept = math.ceil(KEEP_RATE * image_tokens)
        expected.append(prefix + kept + 1)  # prefix, kept, fused
        image_tokens = kept + 1
    assert outputs == expected
    first, second = evit_patch.kept_tokens(model)
    assert first.token_of_patch.shape[1] == grid  # every patch is an image token, nothing else is
    assert first.kept_index.shape[1] == math.ceil(KEEP_RATE * grid)
    assert second.kept_index.shape[1] == math.ceil(KEEP_RATE * (math.ceil(KEEP_RATE * grid) + 1))


POSITION_NAMES = [name for name in timm.list_models(VIT_LIKE) if re.search(f"{ROTARY_FAMILIES}|{BIAS_FAMILIES}", name)
                  and expected_reason(name) is None]


@pytest.mark.parametrize("name", POSITION_NAMES)
def test_position_model_at_full_width_keeps_exact_counts_on_the_meta_device(name: str) -> None:
    """Every rotary or relative-position-bias architecture as published (full width and depth, its
    own input size) is patched and run on the meta device: each block after a layer holds exactly
    the prefix, the kept tokens and the fused one, so the table or bias each block is given matches
    the tokens it holds (a bias of another size would not broadcast against the attention logits)."""
    with torch.device("meta"):
        model = timm.create_model(name).eval()
    depth = len(model.blocks)
    layers = [depth // 4, depth // 2, 3 * depth // 4]
    evit_patch.apply_evit(model, layers, KEEP_RATE)
    lengths: list[int] = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
    size = input_size(model)
    model(torch.empty(2, 3, *size, device="meta"))
    grid = patch_grid(model, size)
    prefix, image_tokens, expected = model.num_prefix_tokens, grid, []
    for index in range(depth):
        if index in layers:
            image_tokens = math.ceil(KEEP_RATE * image_tokens) + 1
        expected.append(prefix + image_tokens)
    assert lengths == expected
