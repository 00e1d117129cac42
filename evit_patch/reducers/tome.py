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

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from evit_patch.core.key_weighting import KeyWeights
from evit_patch.core.reduction import LayerContext, Reduction, TokenMap, TokenReducer, identity_reduction, token_rows
from evit_patch.core.scores import AttentionTensors
from evit_patch.reducers.evit import kept_token_count


def merged_token_count(num_tokens: int, keep_rate: float) -> int:
    """Image tokens after merging: EViT's kept tokens plus its fused one."""
    return min(num_tokens, kept_token_count(num_tokens, keep_rate) + 1)


def bipartite_merge(x: Tensor, metric: Tensor, sizes: Tensor, num_merged: int) -> tuple[Tensor, Tensor, Reduction]:
    """Merge ``num_merged`` of the tokens ``x`` ``(B, n, C)`` into others.

    Args:
        metric: ``(B, n, d)`` features whose cosine similarity picks the partners.
        sizes: ``(B, n)`` patches held by each token; merges are size-weighted averages,
            so ``sum(sizes * x)`` and ``sum(sizes)`` are conserved.
        num_merged: at most the size of set A, ``ceil(n / 2)``.

    Returns:
        the merged tokens ``[unmerged A, B]``, their sizes,
        and the :class:`Reduction` with each incoming token's destination (no prefix).
    """
    batch, count, channels = x.shape
    a_index = torch.arange(0, count, 2, device=x.device)
    b_index = torch.arange(1, count, 2, device=x.device)
    if num_merged > len(a_index):
        raise ValueError(f"bipartite matching merges at most {len(a_index)} of {count} tokens per layer "
                         f"(half, rounded up), asked for {num_merged}: raise the keep rate to at least 0.5")
    metric = F.normalize(metric.to(torch.promote_types(metric.dtype, torch.float32)), dim=-1)
    similarity = metric[:, a_index] @ metric[:, b_index].transpose(1, 2)
    best, partner = similarity.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged_a, unmerged_a = order[:, :num_merged], order[:, num_merged:]
    target_b = partner.gather(1, merged_a)

    weighted = x * sizes.unsqueeze(-1).to(x.dtype)
    a_tokens, b_tokens = weighted[:, a_index], weighted[:, b_index]
    a_sizes, b_sizes = sizes[:, a_index], sizes[:, b_index]
    b_tokens = b_tokens.scatter_add(1, target_b.unsqueeze(-1).expand(-1, -1, channels),
                                    token_rows(a_tokens, merged_a))
    b_sizes = b_sizes.scatter_add(1, target_b, a_sizes.gather(1, merged_a))
    kept_a = token_rows(a_tokens, unmerged_a)
    out_sizes = torch.cat([a_sizes.gather(1, unmerged_a), b_sizes], dim=1)
    out = torch.cat([kept_a, b_tokens], dim=1) / out_sizes.unsqueeze(-1).to(x.dtype)

    num_unmerged = unmerged_a.shape[1]
    destination_a = torch.empty(batch, len(a_index), dtype=torch.long, device=x.device)
    destination_a.scatter_(1, unmerged_a, torch.arange(num_unmerged, device=x.device).expand(batch, -1))
    destination_a.scatter_(1, merged_a, num_unmerged + target_b)
    destination = torch.empty(batch, count, dtype=torch.long, device=x.device)
    destination[:, a_index] = destination_a
    destination[:, b_index] = num_unmerged + torch.arange(len(b_index), device=x.device).expand(batch, -1)
    received = b_sizes > sizes[:, b_index]  # every token holds at least one patch
    mixed = torch.cat([torch.zeros_like(unmerged_a, dtype=torch.bool), received], dim=1)
    kept_index = torch.cat([a_index[unmerged_a], b_index.expand(batch, -1)], dim=1)
    return out, out_sizes, Reduction(out, TokenMap.merge(kept_index, destination, mixed))


class SizedTokens(TokenReducer):
    """A reducer whose tokens carry the number of patches each holds, from layer to layer.

    The sizes weight later merges and, with ``proportional_attention``, every attention
    from the first reducing block on (``log(size)`` added to the logits, through
    :attr:`key_weights`, which :func:`evit_patch.apply_token_reducer` wires in).
    """

    def __init__(self, proportional_attention: bool = True) -> None:
        # sizes are at least 1, so the softmax needs no guard against a zero normalizer
        self.key_weights = KeyWeights(eps=0.0) if proportional_attention else None
        self.sizes: Optional[Tensor] = None

    def start_forward(self, images: Tensor, training: bool) -> None:
        self.sizes = None
        if self.key_weights is not None:
            self.key_weights.weights = None

    def incoming_sizes(self, x: Tensor, num_image: int) -> Tensor:
        """``(B, n)`` patches held by each image token entering this layer (ones at the first)."""
        sizes = self.sizes
        if sizes is None or sizes.shape != (x.shape[0], num_image):  # a new forward, whatever reset it
            sizes = torch.ones(x.shape[0], num_image, dtype=torch.float32, device=x.device)
        return sizes

    def carry_sizes(self, sizes: Tensor, prefix_count: int) -> None:
        """Keep ``sizes`` of the outgoing image tokens for the next layer and later attention."""
        self.sizes = sizes
        if self.key_weights is not None:  # later attention counts a token as the patches it holds
            self.key_weights.weights = torch.cat([sizes.new_ones(sizes.shape[0], prefix_count), sizes], dim=1)


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
        sizes = self.incoming_sizes(x, num_image)
        _, keys, _, _ = attention
        metric = keys.mean(dim=1)[:, prefix_count:] if keys is not None else x[:, prefix_count:]
        merged, merged_sizes, reduction = bipartite_merge(x[:, prefix_count:], metric, sizes, num_merged)
        self.carry_sizes(merged_sizes, prefix_count)
        return Reduction(torch.cat([x[:, :prefix_count], merged], dim=1), reduction.map)
