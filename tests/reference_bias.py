"""An independent eager EViT forward for timm's relative-position-bias models (BEiT, ViT-RelPos),
for comparison with apply_token_reducer.

Sample by sample, every block is the model's own modules (norms, attention, MLP, LayerScale);
each attention is given, as the shared bias it accepts, the rows and columns of its own full
bias (``_get_rel_pos_bias()``, ``rel_pos.get_bias()``, or the model's shared one) for the tokens
the sample still holds, picked by a plain list: the prefix tokens' first, then each image
token's grid position. A fused token gets a zero row and column, or by the position rule
``top-member`` those of its highest-scored member. The attention matrix the
scores come from is read off the attention's own non-fused path (the input of its ``attn_drop``).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from reference_evit import kept_count, scores_and_order
from reference_positions import Position, fused_position
from torch import Tensor, nn


def bias_rows(bias: Tensor, num_prefix: int, positions: list[Position]) -> Tensor:
    """The rows and columns of ``bias`` ``([1,] H, P + N, P + N)`` for the prefix tokens and ``positions``."""
    padded = torch.nn.functional.pad(bias.reshape(1, *bias.shape[-3:]), (0, 1, 0, 1))  # a zero last row and column
    index = list(range(num_prefix)) + [padded.shape[-1] - 1 if p is None else num_prefix + p for p in positions]
    return padded[:, :, index][:, :, :, index]


def _is_beit(model: nn.Module) -> bool:
    return hasattr(model, "rel_pos_bias")


def _full_biases(model: nn.Module) -> list[Tensor]:
    """Each block's full bias, taken out of its attention (which then adds none of its own)."""
    shared = model.rel_pos_bias if _is_beit(model) else model.shared_rel_pos
    biases = []
    for block in model.blocks:
        attn = block.attn
        if _is_beit(model):
            own = None if attn.relative_position_bias_table is None else attn._get_rel_pos_bias()
            attn.relative_position_bias_table = None
        else:
            own = None if attn.rel_pos is None else attn.rel_pos.get_bias()
            attn.rel_pos = None
        if shared is not None:
            biases.append(shared() if _is_beit(model) else shared.get_bias())
        else:
            biases.append(own)
    return biases


def _attention(block: nn.Module, x: Tensor, bias: Tensor, beit: bool) -> tuple[Tensor, Tensor]:
    """The block's attention branch (after its LayerScale) and its post-softmax matrix."""
    captured: list[Tensor] = []
    hook = block.attn.attn_drop.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        if beit:
            out = block.attn(block.norm1(x), shared_rel_pos_bias=bias)
            out = out if block.gamma_1 is None else block.gamma_1 * out
        else:
            out = block.ls1(block.attn(block.norm1(x), shared_rel_pos=bias))
    finally:
        hook.remove()
    return out, captured[0][0]


def _mlp(block: nn.Module, x: Tensor, beit: bool) -> Tensor:
    out = block.mlp(block.norm2(x))
    if beit:
        return out if block.gamma_2 is None else block.gamma_2 * out
    return block.ls2(out)


def reference_forward(model: nn.Module, images: Tensor, layers: list[int], keep_rate: float,
                      fuse: bool, top_member: bool = False) -> tuple[Tensor, list[list[list[Position]]]]:
    """Logits of the unpatched ``model`` (pre-norm blocks) with EViT at ``layers``, and each
    sample's grid positions after every reorganizing layer."""
    model = copy.deepcopy(model)
    beit = _is_beit(model)
    for block in model.blocks:
        block.attn.fused_attn = False
    biases = _full_biases(model)
    num_prefix = model.num_prefix_tokens
    tokens = model.patch_embed(images)
    if model.cls_token is not None:
        tokens = torch.cat([model.cls_token.expand(tokens.shape[0], -1, -1), tokens], 1)
    if getattr(model, "pos_embed", None) is not None:
        tokens = tokens + model.pos_embed
    logits, kept = [], []
    for sample in range(images.shape[0]):
        x = tokens[sample:sample + 1]
        positions: list[Optional[int]] = list(range(x.shape[1] - num_prefix))
        history = []
        for index, block in enumerate(model.blocks):
            out, matrix = _attention(block, x, bias_rows(biases[index], num_prefix, positions), beit)
            x = x + out
            if index in layers:
                x, positions = _reorganize(x, positions, matrix, num_prefix, keep_rate, fuse, top_member)
                history.append(positions)
            x = x + _mlp(block, x, beit)
        logits.append(model.forward_head(model.norm(x)))
        kept.append(history)
    return torch.cat(logits), kept


def _reorganize(x: Tensor, positions: list[Position], matrix: Tensor, num_prefix: int, keep_rate: float,
                fuse: bool, top_member: bool) -> tuple[Tensor, list[Position]]:
    """One sample ``(1, N, C)``: its top-k image tokens by class attention (with a class token) or by
    the attention each receives (ViT-RelPos without one), then the fused rest; and the positions kept."""
    scores, order = scores_and_order(matrix, num_prefix, class_token=num_prefix > 0)
    keep = kept_count(len(positions), keep_rate)
    if keep == len(positions):
        return x, positions
    image = x[0, num_prefix:]
    parts = [x[0, :num_prefix], image[order[:keep]]]
    kept_positions = [positions[j] for j in order[:keep]]
    if fuse:
        parts.append(sum(scores[j] * image[j] for j in order[keep:]).unsqueeze(0))
        kept_positions.append(fused_position(positions, order, keep, top_member=top_member))
    return torch.cat(parts).unsqueeze(0), kept_positions
