"""ToMe-style merging: bipartite soft matching with size-weighted averages.

The training-free peer, run at EViT's insertion point and token counts: a layer that
EViT leaves with ``ceil(keep_rate * n) + 1`` image tokens is merged down to as many.
Tokens alternate into sets A and B; each A token's most similar B token (cosine
similarity of the keys averaged over heads) is its partner, and the A tokens with the
most similar partners are averaged into them, weighted by how many patches each holds.
Those sizes are carried through the forward, for later merges and for proportional
attention (every attention from the first merging block on weights its keys by them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from evit_patch.core.reduction import LayerContext, Reduction, TokenMap, identity_reduction
from evit_patch.core.scores import AttentionTensors
from evit_patch.reducers.bipartite import bipartite_destinations, bipartite_matching
from evit_patch.reducers.counting import merged_token_count
from evit_patch.reducers.merging import SizedTokens, merge_by_destination, with_prefix
from evit_patch.reducers.registry import TokenMethod, register_token_method


def bipartite_merge(x: Tensor, metric: Tensor, sizes: Optional[Tensor],
                    num_merged: int) -> tuple[Tensor, Tensor, Reduction]:
    """Merge ``num_merged`` of the tokens ``x`` ``(B, n, C)`` into others
    (:func:`bipartite_destinations`, then :func:`merge_by_destination`).

    Returns:
        the merged tokens ``[unmerged A, B]``, their sizes,
        and the :class:`Reduction` with each incoming token's destination (no prefix).
    """
    kept_index, destination = bipartite_destinations(metric, num_merged)
    out, out_sizes = merge_by_destination(x, sizes, destination, kept_index.shape[1])
    return out, out_sizes, Reduction(out, TokenMap.merge(kept_index, destination))


class ToMeMerge(SizedTokens):
    """Token merging at EViT's layers and counts; prefix tokens are never merged.

    With ``proportional_attention``, blocks after the first merge weight each key by the
    number of patches its token holds (ToMe's ``log(size)`` added to the attention
    logits): :func:`evit_patch.apply_token_reducer` rewrites those attentions to read
    :attr:`key_weights`.
    """

    def __init__(self, proportional_attention: bool = True) -> None:
        super().__init__(proportional_attention)
        self.name = "tome" + ("" if proportional_attention else "(no proportional attention)")

    def reduce(self, x: Tensor, attention: AttentionTensors, context: LayerContext) -> Reduction:
        prefix_count = context.num_prefix_tokens
        num_image = x.shape[1] - prefix_count
        num_merged = num_image - merged_token_count(num_image, context.keep_rate)
        if num_merged <= 0:
            return identity_reduction(x, prefix_count)
        keys = AttentionTensors(*attention).keys  # a plain 4-tuple, as callers gave before, reads the same
        metric = keys.mean(dim=1)[:, prefix_count:] if keys is not None else x[:, prefix_count:]
        kept_index, destination = bipartite_destinations(metric, num_merged)
        out = self.merge_image_tokens(x, destination, num_image - num_merged, prefix_count)
        return Reduction(out, TokenMap.merge(kept_index, destination))



@dataclass(frozen=True)
class ToMeOptions:
    """``proportional_attention``: later attention weights each key by the patches its token holds."""

    proportional_attention: bool = True


register_token_method(TokenMethod("tome", "ToMe-style merging", ToMeMerge, ToMeOptions))

__all__ = ["ToMeMerge", "bipartite_merge", "SizedTokens", "bipartite_destinations", "bipartite_matching",
           "merge_by_destination", "merged_token_count", "with_prefix"]  # this module's names before the split
