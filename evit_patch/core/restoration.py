"""The full patch grid back from a reduced token sequence: one feature per input patch.

A dense head (segmentation, detection) needs a feature at every patch, in grid order.
After reduction each patch is still its own token (kept), inside a token that mixes
several (EViT's fused token, a merged token) or gone (EViT without fusion). The map is
the provenance every reducer records (:class:`~evit_patch.core.reduction.TokenMap`),
followed layer by layer in :class:`PatchPlaces`; restoring is then one row gather of
the current tokens plus a fill for the patches that are not their own token any more.
All of it is index work on ``(B, N)`` tensors and one ``(B, N, C)`` row gather (``carry``
then copies in the rows of the patches that are not their own token), so it is linear in
the tokens and differentiable in the features; ``nearest`` and ``similar`` add an
``(B, N, N)`` argmin.

Fills for a patch that is not its own token (``FILLS``):

- ``source``: the token that holds it (the fused or merged token; ToMe's "unmerge");
  a dropped patch gets zeros.
- ``carry``: its own feature from the last block where it was still its own token,
  carried forward (needs every block's output: :func:`evit_patch.forward_intermediates`
  hooks keep it).
- ``nearest``: the nearest patch on the grid that is still its own token.
- ``similar``: the patch still its own token whose feature was most like its own
  (cosine) as they entered the last reduction layer: nearest in feature space rather
  than on the grid (needs that grid, as ``carry`` does).
- ``zeros``: nothing (the "no restoration" baseline: kept tokens in place, holes empty).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Optional, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from evit_patch.core.reduction import TokenMap, prefix_and_kept

Fill = Literal["source", "carry", "nearest", "similar", "zeros"]
FILLS: tuple[str, ...] = get_args(Fill)
NEEDS_ENTERING_GRID = ("carry", "similar")
"""Fills that read the full grid as it entered the last reduction layer (``previous``)."""
KEPT, FUSED, DROPPED = 0, 1, 2


def check_fill(fill: str) -> Fill:
    """``fill`` if it is one of :data:`FILLS`; a clear error otherwise."""
    if fill not in FILLS:
        raise ValueError(f"restoration fill must be one of {list(FILLS)}, got {fill!r}")
    return fill  # type: ignore[return-value]


@dataclass(frozen=True)
class PatchPlaces:
    """Where every input patch is in the current token sequence.

    Attributes:
        token_of_patch: ``(B, N)`` position, among the current image tokens, of the token
            holding each input patch; -1 where it was dropped.
        token_is_mixed: ``(B, m)`` whether each current image token mixes several patches.
        complete: no patch has been dropped (lets the hot path skip the -1 guards).
    """

    token_of_patch: Tensor
    token_is_mixed: Tensor
    complete: bool = True

    @classmethod
    def start(cls, batch: int, num_patches: int, device: torch.device) -> "PatchPlaces":
        """Before any reduction: every patch is its own token, in grid order."""
        return cls(torch.arange(num_patches, device=device).expand(batch, num_patches),
                   torch.zeros(batch, num_patches, dtype=torch.bool, device=device))

    def after(self, record: TokenMap) -> "PatchPlaces":
        """The places after one more reduction layer whose map is ``record``.

        A selection (kept tokens, then a fused token or none) is followed in a few
        operations: a kept token is mixed when it was, the fused token always. A merge
        hands over its own ``mixed``, and a mixed token stays mixed wherever it goes."""
        if record.is_identity:
            return self
        destination = record.destination
        token_of_patch = destination.gather(1, self.token_of_patch.clamp(min=0) if not self.complete
                                            else self.token_of_patch)
        if not self.complete:
            token_of_patch = torch.where(self.token_of_patch >= 0, token_of_patch, -1)
        if record.is_selection:
            mixed = F.pad(self.token_is_mixed.gather(1, record.kept_index), (0, int(record.fused)), value=True)
            return PatchPlaces(token_of_patch, mixed, self.complete and record.fused)
        carried = torch.zeros_like(record.mixed, dtype=torch.long)
        carried.scatter_add_(1, destination.clamp(min=0), self.token_is_mixed.long().masked_fill(destination < 0, 0))
        return PatchPlaces(token_of_patch, record.mixed | (carried > 0), False)

    @cached_property
    def status(self) -> Tensor:
        """``(B, N)`` KEPT, FUSED (inside a mixed token) or DROPPED for each patch."""
        alive = self.token_of_patch >= 0
        in_mixed = self.token_is_mixed.gather(1, self.token_of_patch.clamp(min=0)) & alive
        status = torch.full_like(self.token_of_patch, KEPT)
        status[in_mixed] = FUSED
        status[~alive] = DROPPED
        return status

    @cached_property
    def own(self) -> Tensor:
        """``(B, N)`` whether each patch is still its own, unmixed token."""
        if self.complete:
            return ~self.token_is_mixed.gather(1, self.token_of_patch)
        return (self.token_of_patch >= 0) & ~self.token_is_mixed.gather(1, self.token_of_patch.clamp(min=0))


def places_of(records: list[Optional[TokenMap]], batch: int, num_patches: int, device: torch.device) -> PatchPlaces:
    """:class:`PatchPlaces` after the recorded layers (None: a layer not reached yet)."""
    places = PatchPlaces.start(batch, num_patches, device)
    for record in records:
        if record is not None:
            places = places.after(record)
    return places


def grid_distances(grid_size: tuple[int, int], device: torch.device) -> Tensor:
    """``(N, N)`` squared distances between the patches of a ``rows x cols`` grid."""
    rows, cols = grid_size
    patch = torch.arange(rows * cols, device=device)
    row, col = patch // cols, patch % cols  # exact integers: equal distances tie exactly
    return ((row[:, None] - row[None]).square() + (col[:, None] - col[None]).square()).float()


def feature_distances(features: Tensor) -> Tensor:
    """``(B, N, N)`` one minus the cosine similarity between the patches' features
    ``(B, N, C)``, in at least float32."""
    unit = F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)
    return 1 - unit @ unit.transpose(1, 2)


def nearest_own_patch(own: Tensor, distances: Tensor) -> Tensor:
    """``(B, N)`` for each patch, the patch nearest to it by ``distances`` (``(N, N)`` or
    ``(B, N, N)``) that is its own token: itself when it is one, ties to the first in grid
    order. Index work only, no features are gathered."""
    nearest = distances.expand(own.shape[0], -1, -1).masked_fill(~own.unsqueeze(1), float("inf")).argmin(dim=-1)
    return torch.where(own, torch.arange(own.shape[1], device=own.device), nearest)


def restore_sequence(x: Tensor, places: PatchPlaces, num_prefix_tokens: int, fill: Fill, *,
                     previous: Optional[Tensor] = None, grid_size: Optional[tuple[int, int]] = None) -> Tensor:
    """A reduced sequence ``(B, P + m, C)`` as the full one ``(B, P + N, C)``: the prefix tokens,
    then one feature per patch in grid order.

    One row copy takes the prefix and the token holding each patch (the same padded-index
    copy the reducers use), and one ``masked_fill`` or row copy applies the fill: at batch
    1 every operation costs more than its arithmetic, and this runs once per block handed
    out. ``carry`` reads from ``previous`` only the rows it needs: that grid was written
    blocks ago and is no longer in cache.

    Args:
        places: where each patch is now (:func:`places_of`).
        fill: how a patch that is not its own token is filled (see the module docstring).
        previous: ``carry`` and ``similar``: the full sequence ``(B, P + N, C)`` as it
            entered the last reduction layer (``carry`` takes the patches' features from
            it, ``similar`` compares them there).
        grid_size: ``nearest`` only: ``(rows, cols)`` of the patch grid.
    """
    token_of_patch = places.token_of_patch
    if fill in NEEDS_ENTERING_GRID and previous is None:
        raise ValueError(f"fill {fill!r} needs the sequence as it entered the last reduction layer (previous=); "
                         "evit_patch.dense_outputs keeps it, restore_tokens cannot")
    if fill in ("nearest", "similar"):
        distances = _distances(fill, token_of_patch, grid_size, previous, num_prefix_tokens)
        token_of_patch = token_of_patch.gather(1, nearest_own_patch(places.own, distances))
    restored = prefix_and_kept(x, num_prefix_tokens, token_of_patch if places.complete else token_of_patch.clamp(min=0))
    if fill in ("nearest", "similar"):
        return restored
    if fill == "carry":  # only the rows of the patches that are not their own token are read from previous
        holes = F.pad(~places.own, (num_prefix_tokens, 0), value=False).flatten().nonzero().squeeze(1)
        carried = previous.reshape(-1, previous.shape[-1]).index_select(0, holes).to(restored.dtype)
        restored.view(-1, restored.shape[-1]).index_copy_(0, holes, carried)  # a fresh copy: written in place
        return restored
    holes = ~places.own if fill == "zeros" else token_of_patch < 0
    return restored.masked_fill(F.pad(holes, (num_prefix_tokens, 0), value=False).unsqueeze(-1), 0.0)


def _distances(fill: Fill, token_of_patch: Tensor, grid_size: Optional[tuple[int, int]], previous: Optional[Tensor],
               num_prefix_tokens: int) -> Tensor:
    """Between patches: on the grid (``nearest``) or in the features entering the last
    reduction layer (``similar``)."""
    if fill == "similar":
        return feature_distances(previous[:, num_prefix_tokens:])
    if grid_size is None:
        raise ValueError("fill 'nearest' needs the patch grid: pass grid_size=(rows, cols)")
    if grid_size[0] * grid_size[1] != token_of_patch.shape[1]:
        raise ValueError(f"a {grid_size[0]}x{grid_size[1]} grid does not hold the {token_of_patch.shape[1]} "
                         "patches the reduction layers saw; pass the grid of the input the model ran on")
    return grid_distances(grid_size, token_of_patch.device)
