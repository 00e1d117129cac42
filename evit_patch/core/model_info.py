"""What evit_patch needs to know about a model: its blocks, prefix tokens, input size."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from evit_patch.core.scores import ScoreMode
from evit_patch.errors import UnsupportedModelError


def model_name(model: nn.Module) -> str:
    """The timm architecture name when known, else the class name."""
    config = getattr(model, "pretrained_cfg", None) or {}
    architecture = config.get("architecture") if isinstance(config, dict) else None
    return f"{architecture} ({type(model).__name__})" if architecture else type(model).__name__


def transformer_blocks(model: nn.Module) -> nn.Sequential | nn.ModuleList:
    """The model's sequence of transformer blocks (timm's ``model.blocks``)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise UnsupportedModelError(
            model_name(model), "it has no `blocks` sequence of transformer blocks (not a ViT-style model)"
        )
    return blocks


_LATE_CLASS_TOKEN_STAGES = ("blocks_token_only", "cls_attn_blocks")  # CaiT, XCiT


def class_token_joins_after_blocks(model: nn.Module) -> bool:
    """Whether the class token is added only after ``blocks`` (CaiT's and XCiT's class-attention
    stage): timm counts it in ``num_prefix_tokens``, but the blocks see patch tokens only."""
    return getattr(model, "cls_token", None) is not None and any(
        hasattr(model, stage) for stage in _LATE_CLASS_TOKEN_STAGES
    )


def prefix_token_count(model: nn.Module) -> int:
    """Class, distillation and register tokens in the sequence ``blocks`` see, which are never
    pruned or fused: timm's ``num_prefix_tokens``, less a class token that joins after ``blocks``."""
    count = getattr(model, "num_prefix_tokens", None)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise UnsupportedModelError(
            model_name(model), "it has no integer `num_prefix_tokens` telling which tokens are class/register tokens"
        )
    return count - 1 if count > 0 and class_token_joins_after_blocks(model) else count


def score_mode(model: nn.Module) -> ScoreMode:
    """Class-attention scores when the blocks see a class token, else mean received attention."""
    if class_token_joins_after_blocks(model):
        return "mean"
    has_class_token = getattr(model, "has_class_token", None)
    if has_class_token is None:
        has_class_token = getattr(model, "cls_token", None) is not None
    return "class" if has_class_token else "mean"


def native_input_shape(model: nn.Module) -> Optional[tuple[int, int, int]]:
    """``(C, H, W)`` the model is built for, or None when it cannot be told."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    in_chans = next(
        (m.in_channels for m in patch_embed.modules() if isinstance(m, nn.Conv2d)), None
    ) if isinstance(patch_embed, nn.Module) else None
    config = getattr(model, "pretrained_cfg", None) or {}
    config_shape = config.get("input_size") if isinstance(config, dict) else None
    if size is None and config_shape is not None:
        size = config_shape[1:]
    if in_chans is None and config_shape is not None:
        in_chans = config_shape[0]
    if size is None or in_chans is None:
        return None
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return int(in_chans), int(height), int(width)


def example_images(model: nn.Module, batch_size: int = 1, img_size: int | tuple[int, int] | None = None, *,
                   seed: Optional[int] = None) -> torch.Tensor:
    """A batch of the model's input shape on its device and dtype: zeros, or standard normal
    noise drawn from ``seed`` (a forward that must really rank tokens needs distinct ones)."""
    shape = native_input_shape(model)
    if shape is None:
        raise ValueError(f"cannot tell the input shape of {model_name(model)}; pass img_size")
    height, width = shape[1:] if img_size is None else (
        (img_size, img_size) if isinstance(img_size, int) else tuple(img_size))
    parameter = next(model.parameters())
    size = (batch_size, shape[0], height, width)
    if seed is None:
        return torch.zeros(size, device=parameter.device, dtype=parameter.dtype)
    noise = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return noise.to(parameter.device, parameter.dtype)
