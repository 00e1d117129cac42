"""Inputs sized to the token sequence (rotary tables, relative position bias) made to follow the kept tokens.

A model hands every block the table of its full patch grid; after a reorganizing block the
later blocks hold fewer image tokens, in another order in each sample. Where each remaining
token came from is the composition of the layers' token maps (:class:`TokenMap`), and the
table's rows are gathered with it. A token that stands for several (EViT's fused token) has
no position of its own (origin -1); a merged token has its representative's (the map's
``kept_index``), or by the rule ``members`` the mean of its members' rows. Prefix tokens are
not in the table (timm's attention rotates image tokens only), so they keep theirs by
construction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal, Optional, get_args

import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import apply_keep_indices_nlc
from torch import Tensor

from evit_patch.core.reduction import TokenMap

NO_POSITION = -1
"""The origin of a token that stands for several and is given no position."""

PositionRule = Literal["representative", "members", "top-member"]
"""Where a token that stands for several sits: ``representative`` (EViT's fused token unrotated,
a merged token at its representative's row; the default of EViT), ``members`` (the mean of its
members' rows, each grid token weighing one; the default of the merging reducers where the
positions have such a mean, :attr:`TokenReducer.position_rule`) or ``top-member`` (EViT's fused
token where its most attended member sits, a merged token as by ``representative``). Measured
in docs/positions.md."""
POSITION_RULES: tuple[str, ...] = get_args(PositionRule)

ATTENTION_BIAS = "attention_bias"
"""The name under which a family declares the bias each attention computes itself (from its own
table) and hands ``scaled_dot_product_attention`` as ``attn_mask``, or is handed by its block
(transformers' BEiT: ``attention_mask``); the other names are block inputs."""


class SequenceInput(ABC):
    """How one block input sized to the image-token sequence follows a reduction."""

    kind = "positions"
    """What it is, for messages."""

    @abstractmethod
    def follow(self, value: Tensor, origin: Tensor) -> Tensor:
        """``value`` for the image tokens ``origin`` ``(B, m)`` names: indices into the
        sequence ``value`` describes, or :data:`NO_POSITION`."""


class MixableInput(SequenceInput):
    """A sequence input that also has a position for a token standing for several grid
    tokens, the :data:`PositionRule` ``members``; inputs without one keep ``representative``."""

    @abstractmethod
    def mix(self, value: Tensor, members: Tensor) -> Tensor:
        """``value`` for image tokens that each stand for the grid tokens ``members``
        ``(B, m, N)`` weighs (rows summing to one)."""


class RotaryTable(MixableInput):
    """timm's rotary tables: ``[sin | cos]`` on the last dim, tokens on the second last
    (``cat`` ``[N, D]``, one depth of ``mixed`` ``[H, N, D]``, ``dinov3``, ``mrope``; a leading
    batch dim after patch dropout). Rows are gathered by timm's own ``apply_keep_indices_nlc``,
    as its ``PatchDropout`` does; a token with no position is not rotated (sin 0, cos 1)."""

    kind = "rotary position embeddings"

    def follow(self, value: Tensor, origin: Tensor) -> Tensor:
        has_batch = value.ndim == 4
        sin, cos = value[..., -2:-1, :].chunk(2, -1)
        unrotated = torch.cat([torch.zeros_like(sin), torch.ones_like(cos)], -1)
        extended = torch.cat([value, unrotated], -2)
        index = torch.where(origin < 0, value.shape[-2], origin)
        rows = apply_keep_indices_nlc(origin, extended, index, pos_embed_has_batch=has_batch)
        return rows if has_batch or value.ndim > 2 else rows.unsqueeze(1)  # [B, N, D] -> [B, 1, N, D] over heads

    def mix(self, value: Tensor, members: Tensor) -> Tensor:
        """The weighted mean of the members' ``[sin | cos]`` rows. A rotation is linear in its
        sin and cos, so a key rotated by the mean is the mean of the key placed at each member."""
        members = members.to(value.dtype)
        if value.ndim == 4:  # [B, H, N, D]: a table per sample already
            return torch.einsum("bmn,bhnd->bhmd", members, value)
        if value.ndim == 3:  # [H, N, D], one depth of a ``mixed`` table
            return torch.einsum("bmn,hnd->bhmd", members, value)
        return torch.einsum("bmn,nd->bmd", members, value).unsqueeze(1)


class RelativeBias(SequenceInput):
    """An additive attention bias ``([1 or B,] H, P + N, P + N)`` over the whole sequence, its
    ``prefix_tokens`` (P) rows and columns first (timm's BEiT and ViT-RelPos): the rows and columns
    of the tokens held are gathered, the prefix ones kept; a token with no position gets a zero row
    and column (no bias to or from it)."""

    kind = "a relative position bias"

    def __init__(self, prefix_tokens: int) -> None:
        self.prefix_tokens = prefix_tokens

    def follow(self, value: Tensor, origin: Tensor) -> Tensor:
        batch, heads, size = origin.shape[0], value.shape[-3], value.shape[-1] + 1
        extended = F.pad(value, (0, 1, 0, 1)).expand(batch, heads, size, size)
        prefix = torch.arange(self.prefix_tokens, device=origin.device).expand(batch, -1)
        image = torch.where(origin < 0, size - 1, origin + self.prefix_tokens)
        index = torch.cat([prefix, image], 1)  # (B, P + m) into the extended bias
        count = index.shape[1]
        rows = extended.gather(2, index[:, None, :, None].expand(batch, heads, count, size))
        return rows.gather(3, index[:, None, None, :].expand(batch, heads, count, count))

    def __repr__(self) -> str:
        return f"RelativeBias(prefix_tokens={self.prefix_tokens})"


def composed_origin(origin: Optional[Tensor], token_map: TokenMap, top_member: bool = False) -> Optional[Tensor]:
    """Where each image token after ``token_map`` came from, given ``origin`` ``(B, n)`` for
    the tokens entering it (None: the full sequence in order). A fused token has no position,
    or with ``top_member`` (where the map records one) that of its most attended member, which
    after several layers may be an earlier fused token's: it sits where that one sits."""
    if token_map.is_identity:
        return origin
    index = token_map.kept_index
    placed = top_member and token_map.top_member is not None
    if placed:
        index = torch.cat([index, token_map.top_member], 1)
    followed = index if origin is None else origin.gather(1, index)
    return F.pad(followed, (0, 1), value=NO_POSITION) if token_map.fused and not placed else followed


def composed_membership(membership: Optional[Tensor], token_map: TokenMap) -> Optional[Tensor]:
    """For each grid image token ``(B, N)``, the image token holding it after ``token_map``
    (-1: discarded), given ``membership`` for the tokens entering it (None: each in its place)."""
    if token_map.is_identity:
        return membership
    destination = token_map.destination
    if membership is None:
        return destination
    held = destination.gather(1, membership.clamp(min=0))
    return torch.where(membership < 0, membership, held)


def member_weights(membership: Tensor, tokens: int) -> Tensor:
    """``(B, tokens, N)``: each image token's members weighing one each, rows summing to one."""
    one_hot = F.one_hot(membership + 1, tokens + 1)[..., 1:].transpose(1, 2).float()
    return one_hot / one_hot.sum(-1, keepdim=True).clamp(min=1)
