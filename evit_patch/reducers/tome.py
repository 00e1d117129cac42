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
from evit_patch.core.per_call import PerCall
from evit_patch.core.reduction import LayerContext, Reduction, TokenMap, TokenReducer, identity_reduction
from evit_patch.core.scores import AttentionTensors, as_dtype, at_least_float32, without_autocast
from evit_patch.reducers.evit import kept_token_count


def merged_token_count(num_tokens: int, keep_rate: float) -> int:
    """Image tokens after merging: EViT's kept tokens plus its fused one."""
    return min(num_tokens, kept_token_count(num_tokens, keep_rate) + 1)


def bipartite_destinations(metric: Tensor, num_merged: int) -> tuple[Tensor, Tensor]:
    """ToMe's bipartite soft matching: where each of the ``n`` tokens goes when
    ``num_merged`` of them are merged.

    Args:
        metric: ``(B, n, d)`` features whose cosine similarity picks the partners.
        num_merged: at most the size of set A, ``ceil(n / 2)``.

    Returns:
        ``kept_index`` ``(B, n - num_merged)``, the token each output stands for (the
        unmerged A tokens, then every B token), and ``destination`` ``(B, n)``, the
        output slot of each incoming token.
    """
    return _matching(metric, num_merged)[:2]


def bipartite_matching(metric: Tensor, num_merged: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`bipartite_destinations`, and the cosine of each merged A token with its
    partner ``(B, num_merged)``, most similar first (what the merge costs)."""
    kept_index, destination, best, order = _matching(metric, num_merged)
    return kept_index, destination, best.gather(1, order[:, :num_merged])


def _matching(metric: Tensor, num_merged: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``kept_index``, ``destination``, each A token's best cosine ``(B, ceil(n / 2))`` and the
    A tokens from most to least similar; the similarities only for who asks for them (at
    batch 1 each operation is a measurable part of a layer)."""
    batch, count, _ = metric.shape
    count_a, count_b = (count + 1) // 2, count // 2
    if num_merged > count_a:
        raise ValueError(f"bipartite matching merges at most {count_a} of {count} tokens per layer "
                         f"(half, rounded up), asked for {num_merged}: raise the keep rate to at least 0.5")
    with without_autocast(metric.device):  # similarities decide the merges: in at least float32
        metric = as_dtype(metric, at_least_float32(metric.dtype))
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize without its expand_as
        best, partner = (metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)).max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    unmerged_a = order[:, num_merged:]
    num_unmerged = count_a - num_merged
    # every A token goes to its partner's slot behind the unmerged ones, unless it stays itself
    destination_a = (partner + num_unmerged).scatter_(1, unmerged_a,
                                                      torch.arange(num_unmerged, device=metric.device).expand(batch, -1))
    destination = torch.empty(batch, count, dtype=torch.long, device=metric.device)
    destination[:, 0::2] = destination_a
    destination[:, 1::2] = torch.arange(num_unmerged, num_unmerged + count_b, device=metric.device)
    b_index = torch.arange(1, count, 2, device=metric.device).expand(batch, -1)
    return torch.cat([unmerged_a * 2, b_index], dim=1), destination, best, order


def with_prefix(destination: Tensor, prefix_count: int) -> Tensor:
    """An image-token ``destination`` ``(B, n)`` over the whole sequence ``(B, P + n)``:
    each prefix token stays in its own slot and the image slots follow them."""
    full = F.pad(destination + prefix_count, (prefix_count, 0))  # prefix token 0 -> slot 0
    if prefix_count > 1:
        full[:, :prefix_count] = torch.arange(prefix_count, device=destination.device)
    return full


def merge_by_destination(x: Tensor, sizes: Optional[Tensor], destination: Tensor,
                         count: int) -> tuple[Tensor, Tensor]:
    """The ``count`` tokens that are the size-weighted averages of the tokens of ``x``
    ``(B, n, C)`` sent to each of them by ``destination`` ``(B, n)``, and their sizes.

    ``sizes`` ``(B, n)`` are the patches each incoming token holds (None: one each), so
    ``sum(sizes * tokens)`` and ``sum(sizes)`` are conserved. Each token is scaled by its
    share of its slot's size before one row-wise ``index_add_`` over the flattened batch,
    so the average costs a single pass over the tokens, and a token that goes alone to its
    slot comes out exactly as it went in. The shares and sums are taken in at least
    float32, outside autocast; only the tokens are cast back to ``x``'s dtype, the sizes
    keep theirs (float32 when None).
    """
    batch, _, channels = x.shape
    rows = destination if batch == 1 else destination + torch.arange(0, batch * count, count, device=x.device)[:, None]
    rows = rows.flatten()
    precision = at_least_float32(x.dtype)
    incoming = None if sizes is None else as_dtype(sizes.flatten(), precision)
    held = torch.ones_like(rows, dtype=precision) if incoming is None else incoming
    totals = held.new_zeros(batch * count).index_add_(0, rows, held)  # a static shape: no graph break when compiled
    share = totals.reciprocal()[rows] if incoming is None else incoming / totals[rows]  # of its slot's size
    with without_autocast(x.device):
        shared = as_dtype(x, precision).reshape(-1, channels) * share.unsqueeze(1)
        out = shared.new_zeros(batch * count, channels).index_add_(0, rows, shared)
    sizes_dtype = torch.float32 if sizes is None else sizes.dtype
    return as_dtype(out.view(batch, count, channels), x.dtype), as_dtype(totals.view(batch, count), sizes_dtype)


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


class SizedTokens(TokenReducer):
    """A reducer whose tokens carry the number of patches each holds, from layer to layer.

    The sizes weight later merges and, with ``proportional_attention``, every attention
    from the first reducing block on (``log(size)`` added to the logits, through
    :attr:`key_weights`, which :func:`evit_patch.apply_token_reducer` wires in). They are
    kept for the whole sequence, each prefix token holding itself, so one tensor serves
    as the next merge's weights and as the attention's key weights.
    """

    def __init__(self, proportional_attention: bool = True) -> None:
        # sizes are at least 1, so the softmax needs no guard against a zero normalizer
        self.key_weights = KeyWeights(eps=0.0) if proportional_attention else None
        self.call = PerCall()  # the sizes of the forward running in each thread

    @property
    def sizes(self) -> Optional[Tensor]:
        """``(B, n)`` patches held by each image token after the last reducing layer of the
        calling thread's last forward."""
        sizes = self.call.get("sizes")
        return None if sizes is None else sizes[:, self.call.get("prefix_count", 0):]

    def start_forward(self, images: Tensor, training: bool) -> None:
        self.call.set("sizes", None)
        if self.key_weights is not None:
            self.key_weights.weights = None

    def incoming_sizes(self, x: Tensor) -> Optional[Tensor]:
        """``(B, P + n)`` patches held by each token of ``x``, prefix tokens included;
        None where every token holds one (the first reducing layer)."""
        sizes = self.call.get("sizes")
        if sizes is None or sizes.shape != x.shape[:2]:  # a new forward, whatever reset it
            return None
        return sizes

    def merge(self, x: Tensor, image_destination: Tensor, image_count: int, prefix_count: int) -> Tensor:
        """``x`` ``(B, P + n, C)`` with its image tokens merged into ``image_count`` by
        ``image_destination`` ``(B, n)``, the prefix tokens unchanged in front; the new
        sizes are kept for the next layer and later attention of the same forward."""
        out, sizes = merge_by_destination(x, self.incoming_sizes(x), with_prefix(image_destination, prefix_count),
                                          prefix_count + image_count)
        self.call.set("sizes", sizes)
        self.call.set("prefix_count", prefix_count)
        if self.key_weights is not None:  # later attention counts a token as the patches it holds
            self.key_weights.weights = sizes
        return out


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
        _, keys, _, _ = attention
        metric = keys.mean(dim=1)[:, prefix_count:] if keys is not None else x[:, prefix_count:]
        kept_index, destination = bipartite_destinations(metric, num_merged)
        out = self.merge(x, destination, num_image - num_merged, prefix_count)
        return Reduction(out, TokenMap.merge(kept_index, destination))
