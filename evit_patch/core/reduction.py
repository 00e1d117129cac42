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
import torch.nn.functional as F
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
    top_member: bool = False  # record a fused token's most attended member (the position rule ``top-member``)

    def scores(self, attention: AttentionTensors) -> Tensor:
        """The paper's attentiveness score of each image token ``(B, n)``."""
        return token_scores(attention, self.score_mode, self.num_prefix_tokens)


class TokenMap:
    """Where the image tokens entering one reduction layer went, derived only when asked.

    The hot path records what a layer decided in the form it has anyway (the kept
    indices, whether a fused token follows them); ``destination`` and ``mixed`` are built
    from that on demand, for :func:`evit_patch.kept_tokens` and the kept-token maps. A
    merging method, which computes them while it merges, hands them over as they are.
    Only index tensors are held, so a record keeps no autograd graph alive. ``top_member``
    ``(B, 1)``, where a selection method records it: the fused token's most attended member.
    """

    def __init__(self, batch: int, incoming: int, device: torch.device, kept_index: Optional[Tensor] = None,
                 fused: bool = False, destination: Optional[Tensor] = None, mixed: Optional[Tensor] = None,
                 top_member: Optional[Tensor] = None) -> None:
        self.batch, self.incoming, self.device = batch, incoming, device
        self._kept_index, self.fused, self.top_member = kept_index, fused, top_member
        self._destination, self._mixed = destination, mixed
        self.is_identity = kept_index is None and destination is None  # every token goes on in its place
        self.is_selection = kept_index is not None and destination is None  # kept tokens, then a fused one or none

    @classmethod
    def identity(cls, batch: int, incoming: int, device: torch.device) -> "TokenMap":
        """Every token goes on unchanged, in its place."""
        return cls(batch, incoming, device)

    @classmethod
    def selection(cls, kept_index: Tensor, incoming: int, fused: bool,
                  top_member: Optional[Tensor] = None) -> "TokenMap":
        """``kept_index`` go on in that order; the others are fused into one token after
        them (``top_member``, if given, the one of them weighing most in it), or discarded."""
        return cls(kept_index.shape[0], incoming, kept_index.device, kept_index.detach(), fused,
                   top_member=None if top_member is None else top_member.detach())

    @classmethod
    def merge(cls, kept_index: Tensor, destination: Tensor, mixed: Optional[Tensor] = None) -> "TokenMap":
        """A merging method's own map: ``kept_index`` has one entry per output token and
        ``destination`` one per incoming token; ``mixed`` is counted from ``destination``
        when not given."""
        return cls(destination.shape[0], destination.shape[1], destination.device, kept_index, False,
                   destination, mixed)

    @property
    def kept_index(self) -> Tensor:
        """``(B, k)`` incoming image tokens that go on as they are (selection methods:
        highest score first) or that represent an output token (merging)."""
        if self._kept_index is None:
            self._kept_index = torch.arange(self.incoming, device=self.device).expand(self.batch, -1)
        return self._kept_index

    @property
    def destination(self) -> Tensor:
        """``(B, n)`` for each incoming image token, the output image token holding it, or
        -1 where it was discarded."""
        if self._destination is None:
            kept = self.kept_index
            keep = kept.shape[1]
            fill = keep if self.fused else -1
            destination = torch.full((self.batch, self.incoming), fill, dtype=torch.long, device=self.device)
            self._destination = destination.scatter_(1, kept, torch.arange(keep, device=self.device).expand_as(kept))
        return self._destination

    @property
    def mixed(self) -> Tensor:
        """``(B, m)`` whether an output image token mixes several incoming tokens (EViT's
        fused token, a merged token)."""
        if self._mixed is None and not (self.is_selection or self.is_identity):  # a merge: outputs that several tokens went to
            held = torch.zeros(self.batch, self.kept_index.shape[1], dtype=torch.long, device=self.device)
            self._mixed = held.scatter_add_(1, self._destination, torch.ones_like(self._destination)) > 1
        if self._mixed is None:
            mixed = torch.zeros(self.batch, self.kept_index.shape[1] + int(self.fused), dtype=torch.bool,
                                device=self.device)
            mixed[:, self.kept_index.shape[1]:] = True
            self._mixed = mixed
        return self._mixed


@dataclass(frozen=True)
class Reduction:
    """The result of one reduction layer: the new tokens ``(B, P + m, C)``, the prefix
    tokens first and unchanged, and the :class:`TokenMap` of where the incoming ones went."""

    tokens: Tensor
    map: TokenMap

    @property
    def kept_index(self) -> Tensor:
        return self.map.kept_index

    @property
    def destination(self) -> Tensor:
        return self.map.destination

    @property
    def mixed(self) -> Tensor:
        return self.map.mixed


class TokenReducer(ABC):
    """A parameter-free method of shortening the token sequence at one layer.

    :meth:`start_forward` lets a method reset what it carries from layer to layer
    (token sizes, outside scores) at the start of each forward of the model.
    """

    name = "reducer"
    key_weights: Optional[KeyWeights] = None  # set: attention from the first layer on weights keys by it
    position_rule = "representative"
    """Where this method's tokens that stand for several sit by default, in a model whose positions
    follow the kept tokens: the :data:`~evit_patch.core.positions.PositionRule` measured best for it
    (docs/positions.md); an input with no mean of several positions takes ``representative``."""

    @abstractmethod
    def reduce(self, x: Tensor, attention: AttentionTensors, context: LayerContext) -> Reduction:
        """Shorten ``x`` ``(B, P + n, C)`` at one layer."""

    def start_forward(self, images: Tensor, training: bool) -> None:
        """Called with the model's input and train/eval mode before every forward."""

    def describe(self) -> str:
        return self.name


def identity_reduction(x: Tensor, num_prefix_tokens: int) -> Reduction:
    """Every image token goes on unchanged (a layer at keep rate 1.0): nothing is allocated."""
    return Reduction(x, TokenMap.identity(x.shape[0], x.shape[1] - num_prefix_tokens, x.device))


def token_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, j]]`` as ``(B, k, C)``: whole rows copied by one ``index_select``
    over the flattened batch, not ``gather`` with an index expanded over channels, which
    looks up every element (docs/measured.md, "Choices in the code")."""
    batch, length, channels = x.shape
    if batch > 1:
        index = index + torch.arange(0, batch * length, length, device=index.device).unsqueeze(1)
    return x.reshape(batch * length, channels).index_select(0, index.flatten()).view(batch, index.shape[1], channels)


def prefix_and_kept(x: Tensor, num_prefix_tokens: int, kept_index: Tensor, placeholders: int = 0) -> Tensor:
    """``[prefix, kept image tokens in kept_index order]`` in one row copy, followed by
    ``placeholders`` rows (copies of token 0) for the caller to overwrite in place.

    The row index is padded, not concatenated from pieces: every operation here costs
    more than its arithmetic at batch 1, where this runs once per reorganizing layer."""
    rows = F.pad(kept_index + num_prefix_tokens, (num_prefix_tokens, placeholders))
    if num_prefix_tokens > 1:  # one prefix token is row 0, which the pad already wrote
        rows[:, :num_prefix_tokens] = torch.arange(num_prefix_tokens, device=rows.device)
    return token_rows(x, rows)


def selection_reduction(x: Tensor, num_prefix_tokens: int, kept_index: Tensor,
                        fused_weights: Optional[Tensor], top_member: Optional[Tensor] = None) -> Reduction:
    """Keep ``kept_index`` in that order and, with ``fused_weights`` ``(B, n)``, append
    their weighted sum over the other tokens as one fused token (zero weight on kept ones),
    whose most weighted member ``top_member`` ``(B, 1)`` the map records where given.

    The output is written once: one row copy takes the prefix and the kept tokens (and a
    placeholder row where the fused token goes, which is then overwritten), so fusing
    costs no second pass over the sequence. The weights (scores, float32 under autocast)
    are not rounded to the tokens' dtype: the sum is taken in the wider of the two,
    outside autocast, and only the fused token is cast back to ``x``'s dtype."""
    fuse = fused_weights is not None
    tokens = prefix_and_kept(x, num_prefix_tokens, kept_index, placeholders=int(fuse))
    if fuse:
        image = x[:, num_prefix_tokens:]
        precision = torch.promote_types(fused_weights.dtype, image.dtype)
        with without_autocast(x.device):
            fused = torch.bmm(fused_weights.to(precision).unsqueeze(1), image.to(precision))
        tokens[:, -1:] = fused.to(x.dtype)
    return Reduction(tokens, TokenMap.selection(kept_index, x.shape[1] - num_prefix_tokens, fuse, top_member))
