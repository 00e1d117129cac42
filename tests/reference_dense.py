"""An independent eager reference of the restored patch grid after every block of an EViT model.

Each block is re-derived with an explicit attention matrix (``reference_evit``); each
sample's tokens carry, in Python lists, the set of patches they hold and whether they mix
several; the grid is then built patch by patch with plain loops from the rule of each fill:
a patch that is its own token takes that token; otherwise ``source`` takes the token that
holds it (zeros when dropped), ``zeros`` takes zeros, ``carry`` takes the patch's grid row
from the block before, ``nearest`` the row of the nearest own patch (Euclidean distance on
the grid, ties to the first in grid order), ``similar`` the row of the own patch whose
grid row entering the last reduction layer has the highest cosine with its own there
(ties to the first in grid order). Nothing of evit_patch is called.
"""

from __future__ import annotations

import torch
from reference_evit import _attention, _layer_norm, _layer_scale, _mlp, kept_count, scores_and_order
from torch import Tensor, nn


def _reorganize(x: Tensor, attention: Tensor, tokens: list[tuple[set[int], bool]], num_prefix: int,
                keep_rate: float, fuse: bool) -> tuple[Tensor, list[tuple[set[int], bool]]]:
    """One sample ``(N, C)``: keep the top-scored tokens, fuse the rest; the tokens' patch sets follow."""
    scores, order = scores_and_order(attention, num_prefix, True)
    image = x[num_prefix:]
    keep = kept_count(image.shape[0], keep_rate)
    if keep == image.shape[0]:
        return x, tokens
    kept, unkept = order[:keep], order[keep:]
    parts, held = [x[:num_prefix], image[kept]], [tokens[i] for i in kept]
    if fuse:
        parts.append(sum(scores[i] * image[i] for i in unkept).unsqueeze(0))
        held.append((set().union(*(tokens[i][0] for i in unkept)), True))
    return torch.cat(parts), held


def _grid(x: Tensor, tokens: list[tuple[set[int], bool]], num_prefix: int, fill: str, previous: Tensor,
          grid_size: tuple[int, int], entering: Tensor) -> Tensor:
    """One sample's restored image tokens ``(num_patches, C)`` after a block."""
    num_patches = previous.shape[0]
    holder = {patch: index for index, (patches, _) in enumerate(tokens) for patch in patches}
    own = {patch for patches, mixed in tokens if not mixed for patch in patches}
    cols = grid_size[1]
    rows = []
    for patch in range(num_patches):
        if patch in own:
            rows.append(x[num_prefix + holder[patch]])
        elif fill == "source":
            rows.append(x[num_prefix + holder[patch]] if patch in holder else torch.zeros_like(x[0]))
        elif fill == "zeros":
            rows.append(torch.zeros_like(x[0]))
        elif fill == "carry":
            rows.append(previous[patch])
        else:
            def distance(other: int) -> float:
                if fill == "similar":
                    a, b = entering[patch].double(), entering[other].double()
                    return -float(a @ b / (a.norm() * b.norm()))
                return float((other // cols - patch // cols) ** 2 + (other % cols - patch % cols) ** 2)
            nearest = min(sorted(own), key=distance)
            rows.append(x[num_prefix + holder[nearest]])
    return torch.stack(rows)


def reference_grids(model: nn.Module, images: Tensor, layers: list[int], keep_rate: float, fuse: bool,
                    fill: str) -> list[Tensor]:
    """The restored sequence ``(B, P + num_patches, C)`` after every block (before the final norm)
    of a timm ``Block`` ViT with a class token, with EViT at ``layers``."""
    num_prefix = model.num_prefix_tokens
    grid_size = tuple(model.patch_embed.dynamic_feat_size(images.shape[-2:]))
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    num_patches = x.shape[1] - num_prefix
    tokens = [[({p}, False) for p in range(num_patches)] for _ in range(x.shape[0])]
    previous = [x[b, num_prefix:] for b in range(x.shape[0])]
    entering = previous  # the grid as it entered the last reduction layer
    grids = []
    for index, block in enumerate(model.blocks):
        out, attention = _attention(_layer_norm(x, block.norm1), block.attn)
        x = x + _layer_scale(out, block.ls1)
        if index in layers:
            entering = previous
            results = [_reorganize(x[b], attention[b], tokens[b], num_prefix, keep_rate, fuse)
                       for b in range(x.shape[0])]
            x = torch.stack([sample for sample, _ in results])
            tokens = [held for _, held in results]
        x = x + _layer_scale(_mlp(_layer_norm(x, block.norm2), block.mlp), block.ls2)
        previous = [_grid(x[b], tokens[b], num_prefix, fill, previous[b], grid_size, entering[b])
                    for b in range(x.shape[0])]
        grids.append(torch.cat([x[:, :num_prefix], torch.stack(previous)], dim=1))
    return grids
