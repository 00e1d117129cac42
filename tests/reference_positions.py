"""An independent eager EViT forward for timm's rotary ``Eva`` models, for comparison with
apply_token_reducer.

Sample by sample, every block is the model's own modules (norms, attention, MLP, LayerScale
``gamma``) called with the rotary rows of the image tokens the sample still holds, picked
from the model's full table by a plain list of grid positions. The attention matrix the
scores come from is read off the attention's own non-fused path (the input of its
``attn_drop``). A fused token gets no rotation (sin 0, cos 1), or by the position rule
``members`` the mean of its grid tokens' rows, or by the rule ``top-member`` the row of its
highest-scored member (the first token after the kept ones in the score order, placed where
that token sat); prefix tokens are never in the table, as timm's attention rotates image tokens only.
"""

from __future__ import annotations

import copy
from typing import Optional, Union

import torch
from torch import Tensor, nn

from tests.reference_evit import kept_count, scores_and_order

Position = Union[int, None, tuple[int, ...]]  # a grid index, None (no position), or the grid tokens a token holds


def rotary_rows(table: Tensor, positions: list[Position]) -> Tensor:
    """The rows of ``table`` (``[N, D]`` or ``[H, N, D]``, ``[sin | cos]`` last) for ``positions``
    (a tuple of grid tokens: the mean of their rows)."""
    half = table.shape[-1] // 2
    unrotated = torch.cat([table.new_zeros(*table.shape[:-2], 1, half), table.new_ones(*table.shape[:-2], 1, half)], -1)

    def row(position: Position) -> Tensor:
        if position is None:
            return unrotated
        if isinstance(position, tuple):
            return sum(table[..., p:p + 1, :] for p in position) / len(position)
        return table[..., position:position + 1, :]
    return torch.cat([row(p) for p in positions], -2)


def _members(position: Position) -> tuple[int, ...]:
    return position if isinstance(position, tuple) else (position,)


def _attention_and_matrix(block: nn.Module, x: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
    captured: list[Tensor] = []
    hook = block.attn.attn_drop.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        out = block.attn(block.norm1(x), rope=rope)
    finally:
        hook.remove()
    return out, captured[0][0]


def _scaled(gamma: Optional[Tensor], x: Tensor) -> Tensor:
    return x if gamma is None else gamma * x


def fused_position(positions: list[Position], order: list[int], keep: int, members: bool = False,
                   top_member: bool = False) -> Position:
    """Where the fused token of the tokens ``order[keep:]`` sits: nowhere, with ``members`` at all
    their grid tokens, with ``top_member`` where the highest-scored of them sat."""
    if members:
        return tuple(g for j in order[keep:] for g in _members(positions[j]))
    return positions[order[keep]] if top_member else None


def reorganize(x: Tensor, positions: list[Position], matrix: Tensor, num_prefix: int, keep_rate: float,
               fuse: bool, members: bool = False, top_member: bool = False) -> tuple[Tensor, list[Position]]:
    """One sample ``(1, N, C)``: its top-k image tokens by class attention, then the fused rest;
    and the positions of the tokens it keeps (the fused token's by :func:`fused_position`)."""
    scores, order = scores_and_order(matrix, num_prefix, class_token=True)
    keep = kept_count(len(positions), keep_rate)
    if keep == len(positions):
        return x, positions
    image = x[0, num_prefix:]
    parts = [x[0, :num_prefix], image[order[:keep]]]
    kept_positions = [positions[j] for j in order[:keep]]
    if fuse:
        parts.append(sum(scores[j] * image[j] for j in order[keep:]).unsqueeze(0))
        kept_positions.append(fused_position(positions, order, keep, members, top_member))
    return torch.cat(parts).unsqueeze(0), kept_positions


def reference_forward(model: nn.Module, images: Tensor, layers: list[int], keep_rate: float,
                      fuse: bool, members: bool = False,
                      top_member: bool = False) -> tuple[Tensor, list[list[list[Position]]]]:
    """Logits of the unpatched ``model`` (an ``Eva`` with a class token) with EViT at ``layers``,
    and each sample's grid positions after every reorganizing layer."""
    model = copy.deepcopy(model)
    for block in model.blocks:
        block.attn.fused_attn = False
    num_prefix = model.num_prefix_tokens
    tokens, table = model._pos_embed(model.patch_embed(images))
    tokens = model.norm_pre(tokens)
    logits, kept = [], []
    for sample in range(images.shape[0]):
        x, positions, history = tokens[sample:sample + 1], list(range(tokens.shape[1] - num_prefix)), []
        for index, block in enumerate(model.blocks):
            block_table = table[index] if model.rope_mixed else table
            out, matrix = _attention_and_matrix(block, x, rotary_rows(block_table, positions))
            x = x + _scaled(block.gamma_1, out)
            if index in layers:
                x, positions = reorganize(x, positions, matrix, num_prefix, keep_rate, fuse, members, top_member)
                history.append(positions)
            x = x + _scaled(block.gamma_2, block.mlp(block.norm2(x)))
        logits.append(model.forward_head(model.norm(x)))
        kept.append(history)
    return torch.cat(logits), kept
