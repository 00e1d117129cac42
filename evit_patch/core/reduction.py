"""What every token reducer takes and gives back, so one insertion point serves them all.

A reducer runs inside a block, between the attention residual and the MLP. It sees the
tokens, what the attention handed out, and its layer's context; it returns the shorter
sequence and where each incoming image token went, which is all that provenance
(:func:`evit_patch.kept_tokens`) and token labeling need, whatever the method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from evit_patch.core.key_weighting import KeyWeights
from evit_patch.core.scores import AttentionTensors, ScoreMode, token_scores, without_autocast


@dataclass(frozen=True)
class LayerContext:
    """One reduction layer's view of the model during a forward."""

    position: int  # index among the model's reduction layers
    block_index: int
    keep_rate: float
    num_prefix_tokens: int
    score_mode: ScoreMode
    training: bool

    def scores(self, attention: AttentionTensors) -> Tensor:
        """The paper's attentiveness score of each image token ``(B, n)``."""
        return token_scores(attention, self.score_mode, self.num_prefix_tokens)


@dataclass(frozen=True)
class Reduction:
    """The result of one reduction layer.

    Attributes:
        tokens: ``(B, P + m, C)``, the prefix tokens first and unchanged.
        kept_index: ``(B, k)`` incoming image tokens that go on as they are (selection
            methods: highest score first) or that represent an output token (merging).
        destination: ``(B, n)`` for each incoming image token, the output image token
            holding it, or -1 where it was discarded.
        mixed: ``(B, m)`` whether an output image token mixes several incoming tokens
            (EViT's fused token, a merged token).
    """

    tokens: Tensor
    kept_index: Tensor
    destination: Tensor
    mixed: Tensor


class TokenReducer(ABC):
    """A parameter-free method of shortening the token sequence at one layer.

    :meth:`start_forward` lets a method reset what it carries from layer to layer
    (token sizes, outside scores) at the start of each forward of the model.
    """

    name = "reducer"
    key_weights: Optional[KeyWeights] = None  # set: attention from the first layer on weights keys by it

    @abstractmethod
    def reduce(self, x: Tensor, attention: AttentionTensors, context: LayerContext) -> Reduction:
        """Shorten ``x`` ``(B, P + n, C)`` at one layer."""

    def start_forward(self, images: Tensor, training: bool) -> None:
        """Called with the model's input and train/eval mode before every forward."""

    def describe(self) -> str:
        return self.name


def identity_reduction(x: Tensor, num_prefix_tokens: int) -> Reduction:
    """Every image token goes on unchanged (a layer at keep rate 1.0)."""
    batch, count = x.shape[0], x.shape[1] - num_prefix_tokens
    index = torch.arange(count, device=x.device).expand(batch, count)
    return Reduction(x, index, index, torch.zeros(batch, count, dtype=torch.bool, device=x.device))


def selection_reduction(x: Tensor, num_prefix_tokens: int, kept_index: Tensor,
                        fused_weights: Optional[Tensor]) -> Reduction:
    """Keep ``kept_index`` in that order and, with ``fused_weights`` ``(B, n)``, append
    their weighted sum over the other tokens as one fused token (zero weight on kept ones).

    The weights (scores, float32 under autocast) are not rounded to the tokens' dtype:
    the sum is taken in the wider of the two, outside autocast, and only the fused token
    is cast back to ``x``'s dtype."""
    prefix, image = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    batch, count, channels = image.shape
    keep = kept_index.shape[1]
    kept = image.gather(1, kept_index.unsqueeze(-1).expand(-1, -1, channels))
    parts = [prefix, kept]
    fill = keep if fused_weights is not None else -1
    destination = torch.full((batch, count), fill, dtype=torch.long, device=x.device)
    destination.scatter_(1, kept_index, torch.arange(keep, device=x.device).expand(batch, keep))
    mixed = torch.zeros(batch, keep, dtype=torch.bool, device=x.device)
    if fused_weights is not None:
        precision = torch.promote_types(fused_weights.dtype, image.dtype)
        with without_autocast(x.device):
            fused = torch.bmm(fused_weights.to(precision).unsqueeze(1), image.to(precision))
        parts.append(fused.to(x.dtype))
        mixed = torch.cat([mixed, mixed.new_ones(batch, 1)], dim=1)
    return Reduction(torch.cat(parts, dim=1), kept_index, destination, mixed)
