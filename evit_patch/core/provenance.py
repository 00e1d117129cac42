"""Which input patches each reduction layer kept, fused or dropped."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from evit_patch.core.restoration import DROPPED, FUSED, KEPT, PatchPlaces
from evit_patch.core.token_patch import reduction_state

__all__ = ["KEPT", "FUSED", "DROPPED", "LayerTokens", "kept_tokens"]


@dataclass(frozen=True)
class LayerTokens:
    """Token provenance after one reduction layer (batch-first tensors).

    Attributes:
        block_index: the block that reduced.
        kept_index: ``(B, k)`` indices of the kept tokens among the image tokens entering
            this layer, highest score first (merging: the token representing each output).
        token_of_patch: ``(B, num_patches)`` position, among this layer's output image
            tokens, of the token that holds each input patch; -1 where it was dropped.
        status: ``(B, num_patches)`` KEPT (the patch is still its own token), FUSED
            (inside a fused or merged token) or DROPPED (discarded).
    """

    block_index: int
    kept_index: Tensor
    token_of_patch: Tensor
    status: Tensor


def kept_tokens(model: nn.Module) -> list[LayerTokens]:
    """Provenance of the last forward of a patched model, one entry per layer.

    Each layer's map from incoming to outgoing tokens is composed with the ones before
    it (:class:`~evit_patch.core.restoration.PatchPlaces`), so any reducer (selection,
    fusion, merging) is followed back to the input patches.
    """
    state = reduction_state(model)
    if any(record is None for record in state.records):
        raise RuntimeError("no token record yet: run a forward pass through the patched model first")
    first = state.records[0]
    places = PatchPlaces.start(first.batch, first.incoming, first.device)
    layers = []
    for block_index, record in zip(state.layers, state.records):
        places = places.after(record)
        layers.append(LayerTokens(block_index, record.kept_index, places.token_of_patch, places.status))
    return layers
