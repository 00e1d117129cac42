"""Size-weighted merging of tokens by destination slot, and a reducer whose tokens carry sizes.

Merging reducers (ToMe-style, training-free EViT) say where each token goes; these average
the tokens that share a slot, weighted by the patches each holds, and carry the sizes from
layer to layer (for later merges and proportional attention).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from evit_patch.core.key_weighting import KeyWeights
from evit_patch.core.per_call import PerCall
from evit_patch.core.reduction import TokenReducer
from evit_patch.core.scores import as_dtype, at_least_float32, without_autocast


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


class SizedTokens(TokenReducer):
    """A reducer whose tokens carry the number of patches each holds, from layer to layer.

    The sizes weight later merges and, with ``proportional_attention``, every attention
    from the first reducing block on (``log(size)`` added to the logits, through
    :attr:`key_weights`, which :func:`evit_patch.apply_token_reducer` wires in). They are
    kept for the whole sequence, each prefix token holding itself, so one tensor serves
    as the next merge's weights and as the attention's key weights.

    A merged token is placed at the mean of its members' positions (``members``), which kept
    a rotary model's answers better than its representative's own position (docs/positions.md).
    """

    position_rule = "members"

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

    def merge_image_tokens(self, x: Tensor, image_destination: Tensor, image_count: int, prefix_count: int) -> Tensor:
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
