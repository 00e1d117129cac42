"""An independent eager EViT forward for timm's Gemma 4 towers, which hand every block its rotary
embedding as ``rope_cos`` and ``rope_sin`` ``(B, N, D)``, for comparison with apply_token_reducer.

Sample by sample, every block is the unpatched model's own modules (its four norms, its attention on
the non-fused path, its gated MLP) called with the cos and sin rows of the patch tokens the sample
still holds, picked from the encoder's own rotary output by a plain list of grid positions. There is
no class token: a token's score is the attention it receives, averaged over heads and queries, read
off the attention's own matrix (the input of its ``attn_drop``). A fused token gets no rotation
(cos 1, sin 0), or by the position rule ``members`` the mean of its grid tokens' rows, by
``top-member`` the row of its highest-scored member.
"""

from __future__ import annotations

import copy
from typing import Union

import torch
from torch import Tensor, nn

from tests.reference_evit import kept_count, scores_and_order
from tests.reference_positions import fused_position

Position = Union[int, None, tuple[int, ...]]  # a grid index, None (no position), or the grid tokens a token holds


def half_rows(half: Tensor, positions: list[Position], unrotated: float) -> Tensor:
    """``(1, n, D)`` rows of one sample's ``cos`` or ``sin`` ``(N, D)`` for ``positions``."""
    def row(position: Position) -> Tensor:
        if position is None:
            return torch.full_like(half[0], unrotated)
        if isinstance(position, tuple):
            return sum(half[p] for p in position) / len(position)
        return half[position]
    return torch.stack([row(p) for p in positions]).unsqueeze(0)


def _attention_and_matrix(block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    captured: list[Tensor] = []
    hook = block.attn.attn_drop.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        out = block.attn(block.norm1(x), cos, sin)
    finally:
        hook.remove()
    return out, captured[0][0]


def _reorganize(x: Tensor, positions: list[Position], matrix: Tensor, keep_rate: float, fuse: bool,
                members: bool, top_member: bool) -> tuple[Tensor, list[Position]]:
    """One sample ``(1, n, C)``: its top-k tokens by received attention, then the fused rest."""
    scores, order = scores_and_order(matrix, 0, class_token=False)
    keep = kept_count(len(positions), keep_rate)
    if keep == len(positions):
        return x, positions
    parts = [x[0, order[:keep]]]
    kept_positions = [positions[j] for j in order[:keep]]
    if fuse:
        parts.append(sum(scores[j] * x[0, j] for j in order[keep:]).unsqueeze(0))
        kept_positions.append(fused_position(positions, order, keep, members, top_member))
    return torch.cat(parts).unsqueeze(0), kept_positions


def gemma4_reference(model: nn.Module, images: Tensor, layers: list[int], keep_rate: float, fuse: bool,
                     members: bool = False, top_member: bool = False) -> tuple[Tensor, list[list[list[Position]]]]:
    """The output of the unpatched ``model`` (a classifier with an average-pool head, or an encoder
    built with ``global_pool='none'``) with EViT at ``layers``, and each sample's grid positions after
    every reorganizing layer."""
    model = copy.deepcopy(model)
    encoder = getattr(model, "encoder", model)
    for block in encoder.blocks:
        block.attn.fused_attn = False
    tokens, position_ids, _ = encoder.patch_embed(images)
    cos, sin = encoder.rotary_emb(tokens, position_ids)
    outputs, kept = [], []
    for sample in range(images.shape[0]):
        x, positions, history = tokens[sample:sample + 1], list(range(tokens.shape[1])), []
        for index, block in enumerate(encoder.blocks):
            rows = half_rows(cos[sample], positions, 1.0), half_rows(sin[sample], positions, 0.0)
            out, matrix = _attention_and_matrix(block, x, *rows)
            x = x + block.norm2(out)
            if index in layers:
                x, positions = _reorganize(x, positions, matrix, keep_rate, fuse, members, top_member)
                history.append(positions)
            x = x + block.norm4(block.mlp(block.norm3(x)))
        outputs.append(model.forward_head(x) if encoder is not model else x)
        kept.append(history)
    return torch.cat(outputs), kept
