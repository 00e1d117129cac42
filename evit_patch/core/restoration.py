"""The full patch grid back from a reduced token sequence: one feature per input patch.

A dense head (segmentation, detection) needs a feature at every patch, in grid order.
After reduction each patch is still its own token (kept), inside a token that mixes
several (EViT's fused token, a merged token) or gone (EViT without fusion). The map is
the provenance every reducer records (:class:`~evit_patch.core.reduction.TokenMap`),
followed layer by layer in :class:`PatchPlaces`; restoring is then one row gather of
the current tokens plus a fill for the patches that are not their own token any more
(``carry``: one copy of the grid it carries, with the current tokens that are their own
patch written over it). All of it is index work on ``(B, N)`` tensors and one
``(B, N, C)`` row copy, so it is linear in the tokens and differentiable in the features;
``nearest`` and ``similar`` add an ``(B, N, N)`` argmin.

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

from functools import cached_property
from typing import Literal, Optional, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from evit_patch.core.reduction import TokenMap, prefix_and_kept
from evit_patch.core.scores import as_dtype, at_least_float32

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


class PatchPlaces:
    """Where every input patch is in the current token sequence, derived only when asked.

    Each reduction layer adds a link (:meth:`after`); what a fill reads is composed from
    the link before on first use and kept. ``carry`` reads only :attr:`own_rows`, the other
    fills :attr:`token_of_patch` and :attr:`token_is_mixed`: at batch 1 every operation costs
    more than its arithmetic, and a dense call composes the maps once per layer.

    Attributes:
        token_of_patch: ``(B, N)`` position, among the current image tokens, of the token
            holding each input patch; -1 where it was dropped.
        token_is_mixed: ``(B, m)`` whether each current image token mixes several patches.
        complete: no patch has been dropped (lets the hot path skip the -1 guards).
        own_rows: ``(B, m + 1)`` for each current image token that is its own patch, the
            row of that patch in the flattened restored sequence ``(B * (P + N), C)``; the
            spare row ``B * (P + N)`` for a mixed token, and in the last column.
    """

    def __init__(self, batch: int, num_patches: int, device: torch.device, num_prefix_tokens: int = 0,
                 before: Optional["PatchPlaces"] = None, record: Optional[TokenMap] = None) -> None:
        self.batch, self.num_patches, self.device, self.num_prefix_tokens = batch, num_patches, device, num_prefix_tokens
        self.before, self.record = before, record
        self.root: PatchPlaces = self if before is None else before.root

    @classmethod
    def start(cls, batch: int, num_patches: int, device: torch.device, num_prefix_tokens: int = 0) -> "PatchPlaces":
        """Before any reduction: every patch is its own token, in grid order, after
        ``num_prefix_tokens`` prefix tokens (they place :attr:`own_rows`)."""
        return cls(batch, num_patches, device, num_prefix_tokens)

    def after(self, record: TokenMap) -> "PatchPlaces":
        """The places after one more reduction layer whose map is ``record``."""
        if record.is_identity:
            return self
        return PatchPlaces(self.batch, self.num_patches, self.device, self.num_prefix_tokens, self, record)

    @cached_property
    def _held(self) -> tuple[Tensor, Tensor, bool]:
        """``(token_of_patch, token_is_mixed, complete)``. A selection (kept tokens, then a
        fused token or none) is followed in a few operations: a kept token is mixed when it
        was, the fused token always. A merge hands over its own ``mixed``, and a mixed token
        stays mixed wherever it goes."""
        if self.before is None:
            return (torch.arange(self.num_patches, device=self.device).expand(self.batch, self.num_patches),
                    torch.zeros(self.batch, self.num_patches, dtype=torch.bool, device=self.device), True)
        record, (token_of_patch, token_is_mixed, complete) = self.record, self.before._held
        destination = record.destination
        moved = destination.gather(1, token_of_patch if complete else token_of_patch.clamp(min=0))
        if not complete:
            moved = torch.where(token_of_patch >= 0, moved, -1)
        if record.is_selection:
            mixed = F.pad(token_is_mixed.gather(1, record.kept_index), (0, int(record.fused)), value=True)
            return moved, mixed, complete and record.fused
        carried = torch.zeros_like(record.mixed, dtype=torch.long)
        carried.scatter_add_(1, destination.clamp(min=0), token_is_mixed.long().masked_fill(destination < 0, 0))
        return moved, record.mixed | (carried > 0), False

    @property
    def token_of_patch(self) -> Tensor:
        return self._held[0]

    @property
    def token_is_mixed(self) -> Tensor:
        return self._held[1]

    @property
    def complete(self) -> bool:
        return self._held[2]

    @cached_property
    def own_rows(self) -> Tensor:
        """See the class docstring. A selection gathers the kept tokens' rows and gives the
        fused token the spare; a merge gives the spare to every token it mixed."""
        spare = self.batch * (self.num_prefix_tokens + self.num_patches)
        if self.before is None:
            return F.pad(self._sequence_rows[:, self.num_prefix_tokens:], (0, 1), value=spare)
        record, rows = self.record, self.before.own_rows
        if record.is_selection:  # the fused token (and the spare column) take the spare column's row
            return rows.gather(1, F.pad(record.kept_index, (0, int(record.fused) + 1), value=rows.shape[1] - 1))
        return F.pad(rows.gather(1, record.kept_index).masked_fill(record.mixed, spare), (0, 1), value=spare)

    @cached_property
    def carry_rows(self) -> Tensor:
        """``(B * (P + m),)`` the row in the flattened restored sequence of each current token,
        prefix tokens first: what :func:`restore_sequence`'s ``carry`` writes where."""
        return torch.cat([self.root._sequence_rows[:, :self.num_prefix_tokens], self.own_rows[:, :-1]], dim=1).flatten()

    @cached_property
    def _sequence_rows(self) -> Tensor:
        """``(B, P + N)`` the rows of the flattened full sequence, before any reduction."""
        length = self.num_prefix_tokens + self.num_patches
        return torch.arange(self.batch * length, device=self.device).view(self.batch, length)

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
    unit = F.normalize(as_dtype(features, at_least_float32(features.dtype)), dim=-1)
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
    copy the reducers use), and a ``masked_fill`` applies the fill where it has holes;
    ``carry`` is one copy of ``previous`` and one row write. At batch 1 every operation
    costs more than its arithmetic (three to five times more after a block's forward has
    flushed the caches), and this runs once per block handed out.

    Args:
        places: where each patch is now (:func:`places_of`).
        fill: how a patch that is not its own token is filled (see the module docstring).
        previous: ``carry`` and ``similar``: the full sequence ``(B, P + N, C)`` as it
            entered the last reduction layer (``carry`` takes the patches' features from
            it, ``similar`` compares them there).
        grid_size: ``nearest`` only: ``(rows, cols)`` of the patch grid.
    """
    if fill in NEEDS_ENTERING_GRID and previous is None:
        raise ValueError(f"fill {fill!r} needs the sequence as it entered the last reduction layer (previous=); "
                         "evit_patch.dense_outputs keeps it, restore_tokens cannot")
    if fill == "carry":
        if places.num_prefix_tokens != num_prefix_tokens:
            raise ValueError(f"fill 'carry' places rows after {places.num_prefix_tokens} prefix tokens, the sequence "
                             f"has {num_prefix_tokens}: start the PatchPlaces with num_prefix_tokens={num_prefix_tokens}")
        return _carried(x, places, previous)
    token_of_patch = places.token_of_patch
    if fill in ("nearest", "similar"):
        distances = _distances(fill, token_of_patch, grid_size, previous, num_prefix_tokens)
        token_of_patch = token_of_patch.gather(1, nearest_own_patch(places.own, distances))
    restored = prefix_and_kept(x, num_prefix_tokens, token_of_patch if places.complete else token_of_patch.clamp(min=0))
    if fill in ("nearest", "similar") or (fill == "source" and places.complete):  # source: nothing was dropped
        return restored
    holes = ~places.own if fill == "zeros" else token_of_patch < 0
    return restored.masked_fill(F.pad(holes, (num_prefix_tokens, 0), value=False).unsqueeze(-1), 0.0)


def _carried(x: Tensor, places: PatchPlaces, previous: Tensor) -> Tensor:
    """Fill ``carry``: ``previous`` with the rows of the prefix and of every token that is its
    own patch written over. All of ``x``'s rows are put, by one ``index_put_``, into a copy of
    ``previous`` with one spare row at the end, where the mixed tokens go and which is then
    cut off (on CPU ``cat`` and ``index_put_`` copy rows faster than ``pad`` and ``index_copy_``)."""
    batch, length, channels = previous.shape
    rows = x.reshape(-1, channels)
    restored = torch.cat([as_dtype(previous, x.dtype).reshape(batch * length, channels), rows[:1]])  # the spare: any row
    restored.index_put_((places.carry_rows,), rows)  # a fresh copy: written in place
    return restored[:-1].view(batch, length, channels)


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
