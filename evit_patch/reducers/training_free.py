"""Training-free EViT: the paper's layers and token counts, a reduced sequence that later
blocks can read without fine-tuning.

Paper EViT used off the shelf hands later blocks a sequence they never saw: the
inattentive tokens are replaced by one fused token whose raw-score weights sum to less
than 1, and each kept token counts as one key however much it stands for. Three changes
address that, each a pure function here (what each is worth: ``docs/findings.md``):

- :func:`absorb_into_kept` (where a layer does not pool, below): keep the
  ``ceil(keep_rate * n) + 1`` most attended tokens (EViT's kept tokens plus its fused one:
  the same count) and add each other token into the kept token it is most similar to
  (cosine of the tokens), as a size-weighted average, so no token's content is lost and a
  fused token is an average, not a shrunken sum;
- token sizes (patches held) carried from layer to layer and read by every later
  attention as proportional attention (``log size`` on the logits, :class:`KeyWeights`,
  as ToMe), so a token that absorbed others counts as many;
- pooling (prune-or-pool, as PPT chooses per layer): wherever ToMe's bipartite matching
  can merge as many tokens (keep rate >= 0.5), the layer merges close pairs of tokens
  (cosine of the tokens themselves, not of the keys) instead of absorbing; the other
  choices, per sample by which merge is closer (:func:`pools_closer`) and never pooling,
  stay selectable, for all layers or one choice per layer (how the default was chosen:
  ``docs/findings.md``; per layer, ``evit_patch.tune`` measures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, Union, get_args

import torch
from torch import Tensor

from evit_patch.core.reduction import LayerContext, Reduction, TokenMap, identity_reduction, token_rows
from evit_patch.core.scores import AttentionTensors, as_dtype, at_least_float32, without_autocast
from evit_patch.reducers.bipartite import bipartite_destinations, bipartite_matching
from evit_patch.reducers.counting import merged_token_count
from evit_patch.reducers.merging import SizedTokens, merge_by_destination
from evit_patch.reducers.registry import TokenMethod, register_token_method

Pooling = Literal["always", "closer", "never"]
POOLINGS: tuple[str, ...] = get_args(Pooling)


def pools_closer(pooled_similarity: Tensor, absorbed_similarity: Tensor) -> Tensor:
    """``(B,)`` whether each sample's bipartite merge sends its tokens, in total, closer to
    their destinations than absorbing does (cosine similarities of the merged tokens,
    ``(B, r)`` each for the same ``r`` tokens merged); a tie absorbs, as EViT would."""
    return pooled_similarity.sum(dim=1) > absorbed_similarity.sum(dim=1)


def absorb_destinations(image: Tensor, scores: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the ``keep`` highest-scored of the image tokens ``(B, n, C)`` and send every
    other one to the kept token most similar to it (cosine of the tokens).

    Returns:
        ``kept_index`` ``(B, keep)`` in sequence order (output slot ``j`` holds kept token
        ``kept_index[:, j]``: the kept tokens keep their relative places, which a later
        layer's bipartite pooling, alternating over the sequence, relies on),
        ``destination`` ``(B, n)``, each token's slot, and ``similarity`` ``(B, n - keep)``,
        the cosine of each absorbed token with the kept token it goes into.
        ``scores`` pick the kept tokens only; the merge (:func:`merge_by_destination`)
        weights by sizes, not scores.
    """
    batch, count, _ = image.shape
    top = scores.topk(keep, dim=1, sorted=False).indices
    is_kept = torch.zeros(batch, count, dtype=torch.uint8, device=image.device).scatter_(1, top, 1)
    # one stable sort puts the other tokens, then the kept ones, each in sequence order (as a later pooling
    # expects): the exact complement, ties and all, with static shapes (no graph break when compiled)
    order = is_kept.sort(dim=1, stable=True).indices
    other_index, kept_index = order[:, : count - keep], order[:, count - keep:]
    precision = at_least_float32(image.dtype)
    with without_autocast(image.device):
        tokens = as_dtype(image, precision)
        kept = token_rows(tokens, kept_index)
        others = token_rows(tokens, other_index)
        directions = kept / kept.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        projection, partner = (others @ directions.transpose(1, 2)).max(dim=-1)
        similarity = projection / others.norm(dim=-1).clamp_min(1e-12)  # the argmax needs no other token's length
    slots = torch.arange(keep, device=image.device).expand(batch, -1)
    destination = torch.empty(batch, count, dtype=torch.long, device=image.device).scatter_(1, kept_index, slots)
    return kept_index, destination.scatter_(1, other_index, partner), similarity


def absorb_into_kept(image: Tensor, scores: Tensor, sizes: Optional[Tensor],
                     keep: int) -> tuple[Tensor, Tensor, TokenMap]:
    """:func:`absorb_destinations`, then the size-weighted average of each kept token
    with the tokens it absorbed (``sizes`` ``(B, n)``, None: one patch each): the
    ``keep`` output tokens, their sizes and the map."""
    kept_index, destination, _ = absorb_destinations(image, scores, keep)
    out, out_sizes = merge_by_destination(image, sizes, destination, keep)
    return out, out_sizes, TokenMap.merge(kept_index, destination)


class TrainingFreeEvit(SizedTokens):
    """EViT for models that will not be fine-tuned (``apply_evit(..., variant="training-free")``).

    At each of EViT's layers it leaves ``ceil(keep_rate * n) + 1`` image tokens, as the
    paper's kept tokens plus fused token. ``pooling``: ``always`` (default) merges by ToMe's
    bipartite matching of the tokens wherever it can, which is at most half the tokens, so
    below keep 0.5 a layer absorbs instead: the most attended tokens are kept and absorb the
    others (:func:`absorb_into_kept`); ``closer`` pools only the samples where that merges
    closer tokens than absorbing (:func:`pools_closer`); ``never`` always absorbs. Token
    sizes go from layer to layer, and with ``proportional_attention`` every attention from
    the first layer on weights its keys by them.
    """

    def __init__(self, pooling: Pooling | Sequence[Pooling] = "always", proportional_attention: bool = True) -> None:
        per_layer = (pooling,) if isinstance(pooling, str) else tuple(pooling)
        if not per_layer or any(choice not in POOLINGS for choice in per_layer):
            raise ValueError(f"pooling must be one of {list(POOLINGS)} or a list of them (one per layer), got {pooling!r}")
        super().__init__(proportional_attention)
        self.pooling = pooling if isinstance(pooling, str) else per_layer
        options = [f"pooling={'/'.join(per_layer)}"] + ([] if proportional_attention else ["no proportional attention"])
        self.name = f"evit-training-free({', '.join(options)})"

    def pooling_at(self, position: int) -> Pooling:
        """The pooling choice of the ``position``-th reduction layer (one choice: every layer's)."""
        if isinstance(self.pooling, str):
            return self.pooling
        if position >= len(self.pooling):
            raise ValueError(f"pooling names {len(self.pooling)} layers, but reduction layer {position + 1} reduces; "
                             "give one choice per layer")
        return self.pooling[position]

    def reduce(self, x: Tensor, attention: AttentionTensors, context: LayerContext) -> Reduction:
        prefix_count = context.num_prefix_tokens
        num_image = x.shape[1] - prefix_count
        keep = merged_token_count(num_image, context.keep_rate)
        if keep >= num_image:
            return identity_reduction(x, prefix_count)
        image = x[:, prefix_count:]
        kept_index, destination = self.destinations(image, lambda: context.scores(attention), keep,
                                                    self.pooling_at(context.position))
        return Reduction(self.merge_image_tokens(x, destination, keep, prefix_count), TokenMap.merge(kept_index, destination))

    def destinations(self, image: Tensor, scores: Callable[[], Tensor], keep: int,
                     pooling: Pooling) -> tuple[Tensor, Tensor]:
        """``(kept_index, destination)`` of the image tokens ``(B, n, C)``, each sample pooled
        or absorbed as ``pooling`` (the layer's choice) says. ``scores`` (the paper's, ``(B, n)``)
        are taken only where a layer may absorb: pooling alone does not read them, and at batch 1
        their half-dozen operations are a measurable part of a layer."""
        num_merged = image.shape[1] - keep
        can_pool = pooling != "never" and num_merged <= (image.shape[1] + 1) // 2
        if not can_pool:
            return absorb_destinations(image, scores(), keep)[:2]
        if pooling == "always":
            return bipartite_destinations(image, num_merged)
        pooled_index, pooled_destination, pooled_similarity = bipartite_matching(image, num_merged)
        absorbed_index, absorbed_destination, absorbed_similarity = absorb_destinations(image, scores(), keep)
        pools = pools_closer(pooled_similarity, absorbed_similarity).unsqueeze(1)
        return torch.where(pools, pooled_index, absorbed_index), torch.where(pools, pooled_destination, absorbed_destination)


@dataclass(frozen=True)
class TrainingFreeOptions:
    """``proportional_attention``: later attention weights each key by the patches its token holds.
    ``pooling``: where a layer pools or absorbs (:class:`TrainingFreeEvit`), one choice or a list
    with one per layer."""

    proportional_attention: bool = True
    pooling: Union[Pooling, list[Pooling]] = "always"


register_token_method(TokenMethod("evit-training-free", "training-free EViT", TrainingFreeEvit, TrainingFreeOptions,
                                  form_of=("evit", {"variant": "training-free"})))
