"""Every token method on one small timm ViT, for the tests that must hold for all of them
(concurrent calls, pickling, compiled graphs)."""

from __future__ import annotations

import copy
from typing import Callable

import timm
import torch
from torch import nn

import evit_patch
from evit_patch.dynamicvit import apply_dynamicvit
from evit_patch.reducers import EvitReducer, OracleGuided, RandomDrop, ToMeMerge, TrainingFreeEvit

LAYERS = [1, 2]
KEEP_RATE = 0.6  # ToMe-style merging and pooling merge at most half the tokens of a layer


def small_vit(seed: int = 0) -> nn.Module:
    """A 4-block ViT with a class and a register token over 8x8 patches of 32-px images."""
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=4,
                             num_heads=3, reg_tokens=1, num_classes=10).eval()


def small_rotary_vit(seed: int = 0) -> nn.Module:
    """A 4-block EVA-02 (a rotary table passed to every block) over the same patches and images,
    with a class-token head (DynamicViT's)."""
    torch.manual_seed(seed)
    return timm.create_model("eva02_tiny_patch14_224", img_size=32, patch_size=4, embed_dim=48, depth=4,
                             num_heads=3, num_classes=10, global_pool="token").eval()


def small_bias_vit(seed: int = 0) -> nn.Module:
    """A 4-block BEiT (each attention adds its own relative position bias, drawn at random here
    as timm initializes it to 0) over the same patches and images."""
    torch.manual_seed(seed)
    model = timm.create_model("beit_base_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=4,
                              num_heads=3, num_classes=10).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.relative_position_bias_table.normal_()
    return model


MODELS: dict[str, Callable[[int], nn.Module]] = {"vit": small_vit, "rotary": small_rotary_vit, "bias": small_bias_vit}


def _oracle_guided(model: nn.Module) -> nn.Module:
    kind = "rotary" if hasattr(model, "rope") else "bias" if hasattr(model, "rel_pos_bias") else "vit"
    oracle = MODELS[kind](1)
    return evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, OracleGuided(oracle, LAYERS))


PATCHES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "evit": lambda model: evit_patch.apply_evit(model, LAYERS, KEEP_RATE),
    "evit-no-fusion": lambda model: evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, EvitReducer(fuse=False)),
    "random": lambda model: evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, RandomDrop(seed=0)),
    "tome": lambda model: evit_patch.apply_token_reducer(model, LAYERS, KEEP_RATE, ToMeMerge()),
    "training-free": lambda model: evit_patch.apply_evit(model, LAYERS, KEEP_RATE, variant="training-free"),
    "training-free-absorbing": lambda model: evit_patch.apply_token_reducer(
        model, LAYERS, KEEP_RATE, TrainingFreeEvit(pooling="never")),
    "training-free-closer": lambda model: evit_patch.apply_token_reducer(
        model, LAYERS, KEEP_RATE, TrainingFreeEvit(pooling="closer")),
    "oracle": _oracle_guided,
    "dynamicvit": lambda model: apply_dynamicvit(model, LAYERS, KEEP_RATE),
}
"""Each method patching a model in place, at the same layers and keep rate."""


BIAS_METHODS = [method for method in PATCHES if method != "dynamicvit"]  # DynamicViT refuses an attention's own bias
"""The methods that patch the relative-position-bias model."""


def patched(method: str, model: str = "vit") -> nn.Module:
    return PATCHES[method](MODELS[model](0))


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def unpatched_copy(model: nn.Module) -> nn.Module:
    """A copy of a patched model with the patch taken off."""
    clone = copy.deepcopy(model)
    return evit_patch.remove_evit(clone)
