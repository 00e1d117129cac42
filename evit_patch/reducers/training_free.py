"""Training-free EViT: the paper's layers and token counts, a reduced sequence that later
blocks can read without fine-tuning.

Paper EViT used off the shelf hands later blocks a sequence they never saw: the
inattentive tokens are replaced by one fused token whose raw-score weights sum to less
than 1, and each kept token counts as one key however much it stands for. Measured on the
Fashion-MNIST base (``docs/findings.md``), three changes close most of the gap, and each
is a pure function here:

- :func:`absorb_into_kept`: keep the ``ceil(keep_rate * n) + 1`` most attended tokens (EViT's
  kept tokens plus its fused one: the same count and MACs) and add each other token into
  the kept token it is most similar to (cosine of the tokens), as a size-weighted average,
  so no token's content is lost and a fused token is an average, not a shrunken sum;
- token sizes (patches held) carried from layer to layer and read by every later
  attention as proportional attention (``log size`` on the logits, :class:`KeyWeights`,
  as ToMe), so a token that absorbed others counts as many;
- :func:`flat_scores` (PPT's prune-or-pool): where the class attention is flat (its
  coefficient of variation below ``flat_threshold``) it says nothing about which tokens
  matter, and the layer merges by ToMe's bipartite matching of keys instead.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from evit_patch.core.reduction import LayerContext, Reduction, TokenMap, identity_reduction, token_rows
from evit_patch.core.scores import AttentionTensors, as_dtype, at_least_float32, without_autocast
from evit_patch.reducers.tome import SizedTokens, bipartite_destinations, merge_by_destination, merged_token_count

FLAT_THRESHOLD = 0.7
"""Coefficient of variation of the class-attention scores below which a layer pools. On the
Fashion-MNIST ViT it is 0.34 at the first reorganization layer and 1.1 to 1.8 at the
later ones; on the LV-ViT and register bases see ``docs/findings.md``."""


def flat_scores(scores: Tensor, threshold: float) -> Tensor:
    """``(B,)`` whether each sample's scores ``(B, n)`` are flat: standard deviation over
    mean (population, so it does not depend on how many tokens there are) below
    ``threshold``. Scale-free, so raw class-attention scores need no normalizing."""
    spread, mean = torch.std_mean(scores, dim=1, correction=0)
    return spread < threshold * mean


def absorb_destinations(image: Tensor, scores: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """Keep the ``keep`` highest-scored of the image tokens ``(B, n, C)`` and send every
    other one to the kept token most similar to it (cosine of the tokens).

    Returns:
        ``kept_index`` ``(B, keep)`` in sequence order (output slot ``j`` holds kept token
        ``kept_index[:, j]``: the kept tokens keep their relative places, which a later
        layer's bipartite pooling, alternating over the sequence, relies on) and
        ``destination`` ``(B, n)``, each token's slot.
        ``scores`` pick the kept tokens only; the merge (:func:`merge_by_destination`)
        weights by sizes, not scores.
    """
    batch, count, _ = image.shape
    top = scores.topk(keep, dim=1, sorted=False).indices
    unkept = torch.ones(batch, count, dtype=torch.bool, device=image.device).scatter_(1, top, False)
    kept_index = (~unkept).nonzero()[:, 1].view(batch, keep)  # in sequence order, as a later pooling expects
    other_index = unkept.nonzero()[:, 1].view(batch, count - keep)  # the exact complement, ties and all
    precision = at_least_float32(image.dtype)
    with without_autocast(image.device):
        tokens = as_dtype(image, precision)
        kept = token_rows(tokens, kept_index)
        # cosine's argmax over kept tokens: the other token's own length does not change it
        directions = kept / kept.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        partner = (token_rows(tokens, other_index) @ directions.transpose(1, 2)).max(dim=-1).indices
    slots = torch.arange(keep, device=image.device).expand(batch, -1)
    destination = torch.empty(batch, count, dtype=torch.long, device=image.device).scatter_(1, kept_index, slots)
    return kept_index, destination.scatter_(1, other_index, partner)


def absorb_into_kept(image: Tensor, scores: Tensor, sizes: Optional[Tensor],
                     keep: int) -> tuple[Tensor, Tensor, TokenMap]:
    """:func:`absorb_destinations`, then the size-weighted average of each kept token
    with the tokens it absorbed (``sizes`` ``(B, n)``, None: one patch each): the
    ``keep`` output tokens, their sizes and the map."""
    kept_index, destination = absorb_destinations(image, scores, keep)
    out, out_sizes = merge_by_destination(image, sizes, destination, keep)
    return out, out_sizes, TokenMap.merge(kept_index, destination)


def _per_sample(flat: Tensor, image: Tensor, scores: Tensor, metric: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """``(kept_index, destination)`` of a batch that mixes flat and peaked samples: the
    samples ``flat`` ``(B,)`` selects are pooled by ``metric``, the others absorbed, each
    computed on its own rows only, so no sample's result depends on its batch."""
    pooling, absorbing = flat.nonzero().flatten(), (~flat).nonzero().flatten()
    pooled_index, pooled_destination = bipartite_destinations(metric[pooling], image.shape[1] - keep)
    absorbed_index, absorbed_destination = absorb_destinations(image[absorbing], scores[absorbing], keep)
    kept_index = pooled_index.new_empty(len(flat), keep)
    destination = pooled_destination.new_empty(len(flat), image.shape[1])
    kept_index[pooling], kept_index[absorbing] = pooled_index, absorbed_index
    destination[pooling], destination[absorbing] = pooled_destination, absorbed_destination
    return kept_index, destination


class TrainingFreeEvit(SizedTokens):
    """EViT for models that will not be fine-tuned (``apply_evit(..., variant="training-free")``).

    At each of EViT's layers it leaves ``ceil(keep_rate * n) + 1`` image tokens, as the
    paper's kept tokens plus fused token. Peaked class attention: the most attended
    tokens are kept and absorb the others (:func:`absorb_into_kept`). Flat class
    attention (:func:`flat_scores`; ``flat_threshold=None`` never): ToMe's bipartite
    merge of keys, which merges at most half the tokens, so below keep 0.5 such a layer
    absorbs too. Token sizes go from layer to layer, and with ``proportional_attention``
    every attention from the first layer on weights its keys by them.
    """

    def __init__(self, flat_threshold: Optional[float] = FLAT_THRESHOLD, proportional_attention: bool = True) -> None:
        if flat_threshold is not None and not flat_threshold > 0:
            raise ValueError(f"flat_threshold must be positive or None, got {flat_threshold!r}")
        super().__init__(proportional_attention)
        self.flat_threshold = flat_threshold
        options = [f"flat_threshold={flat_threshold}"] + ([] if proportional_attention else ["no proportional attention"])
        self.name = f"evit-training-free({', '.join(options)})"

    def reduce(self, x: Tensor, attention: AttentionTensors, context: LayerContext) -> Reduction:
        prefix_count = context.num_prefix_tokens
        num_image = x.shape[1] - prefix_count
        keep = merged_token_count(num_image, context.keep_rate)
        if keep >= num_image:
            return identity_reduction(x, prefix_count)
        scores = context.scores(attention)
        image = x[:, prefix_count:]
        flat = self._flat(scores, num_image - keep, num_image)
        pooled = int(flat.sum()) if flat is not None else 0
        if pooled == 0:
            kept_index, destination = absorb_destinations(image, scores, keep)
        else:  # the keys, averaged over heads, are ToMe's similarity metric
            _, keys, _, _ = attention
            metric = keys.mean(dim=1)[:, prefix_count:] if keys is not None else image
            if pooled == len(flat):
                kept_index, destination = bipartite_destinations(metric, num_image - keep)
            else:
                kept_index, destination = _per_sample(flat, image, scores, metric, keep)
        return Reduction(self.merge(x, destination, keep, prefix_count), TokenMap.merge(kept_index, destination))

    def _flat(self, scores: Tensor, num_merged: int, num_image: int) -> Optional[Tensor]:
        """Which samples pool at this layer; None when none can (no threshold, or more to
        merge than bipartite matching allows)."""
        if self.flat_threshold is None or num_merged > (num_image + 1) // 2:
            return None
        return flat_scores(scores, self.flat_threshold)
