"""An independent eager EViT forward for Hugging Face DINOv3, whose model hands every layer
``position_embeddings=(cos, sin)`` for the patch grid, for comparison with apply_token_reducer.

Sample by sample, every layer is the unpatched model's own modules (norms, the attention in its
eager implementation, LayerScale, MLP) called with the cos and sin rows of the patch tokens the
sample still holds, picked by a plain list of grid positions. The attention matrix the scores
come from is the eager attention's own weights. A fused token gets no rotation (cos 1, sin 0), or
by the position rule ``members`` the mean of its grid tokens' rows, by ``top-member`` the row of its
highest-scored member;
prefix tokens (class, registers) are never given rows, as transformers rotates the last rows only.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from tests.reference_positions import Position, reorganize


def pair_rows(cos: Tensor, sin: Tensor, positions: list[Position]) -> tuple[Tensor, Tensor]:
    """The rows of ``cos`` and ``sin`` (``[N, D]``) for ``positions`` (None: cos 1, sin 0; a tuple
    of grid tokens: the mean of their rows)."""
    def row(half: Tensor, position: Position, unrotated: float) -> Tensor:
        if position is None:
            return torch.full_like(half[0], unrotated)
        if isinstance(position, tuple):
            return sum(half[p] for p in position) / len(position)
        return half[position]
    return (torch.stack([row(cos, p, 1.0) for p in positions]),
            torch.stack([row(sin, p, 0.0) for p in positions]))


def dinov3_reference(model: nn.Module, images: Tensor, layers: list[int], keep_rate: float, fuse: bool,
                     members: bool = False, top_member: bool = False) -> tuple[Tensor, list[list[list[Position]]]]:
    """``last_hidden_state`` of the unpatched ``DINOv3ViTModel`` with EViT at ``layers``, and each
    sample's grid positions after every reorganizing layer."""
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    num_prefix = 1 + model.config.num_register_tokens
    tokens = model.embeddings(images)
    cos, sin = model.rope_embeddings(images)
    outputs, kept = [], []
    for sample in range(images.shape[0]):
        x, positions, history = tokens[sample:sample + 1], list(range(cos.shape[0])), []
        for index, layer in enumerate(model.model.layer):
            out, weights = layer.attention(layer.norm1(x), position_embeddings=pair_rows(cos, sin, positions))
            x = x + layer.layer_scale1(out)
            if index in layers:
                x, positions = reorganize(x, positions, weights[0], num_prefix, keep_rate, fuse, members, top_member)
                history.append(positions)
            x = x + layer.layer_scale2(layer.mlp(layer.norm2(x)))
        outputs.append(model.norm(x))
        kept.append(history)
    return torch.cat(outputs), kept
