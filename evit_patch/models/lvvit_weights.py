"""Published LV-ViT checkpoints (zihangJiang/TokenLabeling) onto :class:`LvVit`.

The published files name the patch-embedding stem ``patch_embed.conv1`` / ``bn1`` ...
``conv3`` / ``bn3``; here each conv-BN-ReLU is one timm ``ConvNormAct``
(``patch_embed.stem.{0,1,2}.conv`` / ``.bn``). Every other key (``cls_token``,
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``,
``head``, ``aux_head``) is named alike. A checkpoint already in this model's names
passes through unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

from timm.layers import resample_abs_pos_embed
from timm.models import load_state_dict
from torch import Tensor, nn

from evit_patch.errors import CheckpointError

_STEM_KEY = re.compile(r"^patch_embed\.(conv|bn)([123])\.(.+)$")
_OPTIONAL_KEYS = re.compile(r"\.num_batches_tracked$")  # absent from old BatchNorm checkpoints; torch fills it
_SHOWN = 12


def original_to_model_key(key: str) -> str:
    """``patch_embed.conv2.weight`` -> ``patch_embed.stem.1.conv.weight``; others unchanged."""
    key = key.removeprefix("module.")
    match = _STEM_KEY.match(key)
    if match is None:
        return key
    kind, number, rest = match.groups()
    return f"patch_embed.stem.{int(number) - 1}.{kind}.{rest}"


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _SHOWN else shown


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename published keys, resample ``pos_embed`` to the model's token grid, and refuse
    a checkpoint that does not fit, naming every missing and unexpected key.

    Called by timm when a model is created with ``pretrained=True`` and a local file.
    """
    mapped = {original_to_model_key(key): value for key, value in state_dict.items()}
    expected = model.state_dict()
    missing = sorted(key for key in expected if key not in mapped and not _OPTIONAL_KEYS.search(key))
    unexpected = sorted(key for key in mapped if key not in expected)
    if missing or unexpected:
        lines = [f"the checkpoint does not fit {type(model).__name__} "
                 f"(depth {len(model.blocks)}, width {model.embed_dim}); is it another LV-ViT size?"]
        if missing:
            lines.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            lines.append(f"unexpected keys: {_listing(unexpected)}")
        raise CheckpointError("\n".join(lines))
    position = mapped.get("pos_embed")
    if position is not None and position.shape != expected["pos_embed"].shape:
        mapped["pos_embed"] = resample_abs_pos_embed(
            position, list(model.patch_embed.grid_size), num_prefix_tokens=model.num_prefix_tokens)
    return mapped


def load_lvvit_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a published LV-ViT checkpoint (``.pth``/``.pth.tar`` read weights-only, or
    ``.safetensors``; EMA weights preferred when both are stored) into ``model``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    model.load_state_dict(checkpoint_filter_fn(load_state_dict(str(path)), model))
    return model
