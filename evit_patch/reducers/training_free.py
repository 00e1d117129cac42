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
from evit_patch.core.scores import AttentionTensors, without_autocast
from evit_patch.reducers.tome import SizedTokens, bipartite_merge, merged_token_count

FLAT_THRESHOLD = 0.7
"""Coefficient of variation of the class-attention scores below which a layer pools. On the
Fashion-MNIST ViT it is 0.34 at the first reorganization layer and 1.1 to 1.8 at the
later ones; on the LV-ViT and register bases see ``docs/findings.md``."""


def flat_scores(scores: Tensor, threshold: float) -> Tensor:
    """``(B,)`` whether each sample's scores ``(B, n)`` are flat: standard deviation over
    mean (population, so it does not depend on how many tokens there are) below
    ``threshold``. Scale-free, so raw class-attention scores need no normalizing."""
    return scores.std(dim=1, correction=0) < threshold * scores.mean(dim=1)


def absorb_into_kept(image: Tensor, scores: Tensor, sizes: Tensor, keep: int) -> tuple[Tensor, Tensor, TokenMap]:
    """Keep the ``keep`` highest-scored of the image tokens ``(B, n, C)`` and add every
    other one into the kept token most similar to it.

    Args:
        scores: ``(B, n)`` attentiveness; it picks the kept tokens only, not the weights.
        sizes: ``(B, n)`` patches held by each token; every output token is the
            size-weighted average of the tokens it holds, so ``sum(sizes * tokens)`` and
            ``sum(sizes)`` are conserved.

    Returns:
        the ``keep`` output tokens (highest score first), their sizes, and the map of
        where each incoming token went. Sums are taken in at least float32 (outside
        autocast) and only the tokens are cast back to ``image``'s dtype.
    """
    batch, count, channels = image.shape
    order = scores.argsort(dim=1, descending=True)
    kept_index = order[:, :keep]
    precision = torch.promote_types(image.dtype, torch.float32)
    with without_autocast(image.device):
        kept = token_rows(image, kept_index).to(precision)
        others = token_rows(image, order[:, keep:]).to(precision)
        # cosine's argmax over kept tokens: the other token's own length does not change it
        partner = ((others @ kept.transpose(1, 2)) / kept.norm(dim=-1).clamp_min(1e-12).unsqueeze(1)).argmax(dim=-1)
        slots = torch.arange(keep, device=image.device).expand(batch, -1)
        destination = torch.empty(batch, count, dtype=torch.long, device=image.device).scatter_(
            1, order, torch.cat([slots, partner], dim=1))
        rows = (destination + torch.arange(0, batch * keep, keep, device=image.device).unsqueeze(1)).flatten()
        weighted = (image.to(precision) * sizes.to(precision).unsqueeze(-1)).view(-1, channels)
        sums = weighted.new_zeros(batch * keep, channels).index_add_(0, rows, weighted)
        out_sizes = sizes.new_zeros(batch * keep).index_add_(0, rows, sizes.flatten()).view(batch, keep)
        out = (sums.view(batch, keep, channels) / out_sizes.to(precision).unsqueeze(-1)).to(image.dtype)
    return out, out_sizes, TokenMap.merge(kept_index, destination, out_sizes > sizes.gather(1, kept_index))


def _per_sample(flat: Tensor, pooled: tuple[Tensor, Tensor, TokenMap],
                absorbed: tuple[Tensor, Tensor, TokenMap]) -> tuple[Tensor, Tensor, TokenMap]:
    """Each sample's own layer decision, where a batch mixes flat and peaked scores (so a
    sample's output never depends on the others in its batch)."""
    (pool_tokens, pool_sizes, pool_map), (tokens, sizes, token_map) = pooled, absorbed
    pick = flat.unsqueeze(1)
    merged_map = TokenMap.merge(torch.where(pick, pool_map.kept_index, token_map.kept_index),
                                torch.where(pick, pool_map.destination, token_map.destination),
                                torch.where(pick, pool_map.mixed, token_map.mixed))
    return torch.where(pick.unsqueeze(-1), pool_tokens, tokens), torch.where(pick, pool_sizes, sizes), merged_map


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
        sizes = self.incoming_sizes(x, num_image)
        scores = context.scores(attention)
        image = x[:, prefix_count:]
        flat = self._flat(scores, num_image - keep, num_image)
        if flat is None or not flat.any():
            out, out_sizes, token_map = absorb_into_kept(image, scores, sizes, keep)
        else:
            _, keys, _, _ = attention
            metric = keys.mean(dim=1)[:, prefix_count:] if keys is not None else image
            pooled_tokens, pooled_sizes, pooled = bipartite_merge(image, metric, sizes, num_image - keep)
            result = (pooled_tokens, pooled_sizes, pooled.map)
            if not flat.all():
                result = _per_sample(flat, result, absorb_into_kept(image, scores, sizes, keep))
            out, out_sizes, token_map = result
        self.carry_sizes(out_sizes, prefix_count)
        return Reduction(torch.cat([x[:, :prefix_count], out], dim=1), token_map)

    def _flat(self, scores: Tensor, num_merged: int, num_image: int) -> Optional[Tensor]:
        """Which samples pool at this layer; None when none can (no threshold, or more to
        merge than bipartite matching allows)."""
        if self.flat_threshold is None or num_merged > (num_image + 1) // 2:
            return None
        return flat_scores(scores, self.flat_threshold)
