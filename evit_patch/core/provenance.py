"""Which input patches each reduction layer kept, fused or dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from evit_patch.core.token_patch import reduction_state

KEPT, FUSED, DROPPED = 0, 1, 2


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
    it, so any reducer (selection, fusion, merging) is followed back to the input patches.
    """
    state = reduction_state(model)
    if any(record is None for record in state.records):
        raise RuntimeError("no token record yet: run a forward pass through the patched model first")
    first = state.records[0]
    batch, num_patches, device = first.batch, first.incoming, first.device
    token_of_patch = torch.arange(num_patches, device=device).expand(batch, num_patches)
    token_is_mixed = torch.zeros(batch, num_patches, dtype=torch.bool, device=device)
    layers = []
    for block_index, record in zip(state.layers, state.records):
        alive = token_of_patch >= 0
        # a mixed token stays mixed wherever it goes
        token_is_mixed = _carry_mixed(token_is_mixed, record.destination, record.mixed)
        token_of_patch = torch.where(alive, record.destination.gather(1, token_of_patch.clamp(min=0)), -1)
        alive = token_of_patch >= 0
        in_mixed = token_is_mixed.gather(1, token_of_patch.clamp(min=0)) & alive
        status = torch.full_like(token_of_patch, KEPT)
        status[in_mixed] = FUSED
        status[~alive] = DROPPED
        layers.append(LayerTokens(block_index, record.kept_index, token_of_patch, status))
    return layers


def _carry_mixed(incoming_mixed: Tensor, destination: Tensor, mixed: Tensor) -> Tensor:
    """Output tokens that hold a mixture: mixed by this layer, or receiving a mixed token."""
    carried = torch.zeros_like(mixed, dtype=torch.long)
    sources = incoming_mixed.long().masked_fill(destination < 0, 0)
    carried.scatter_add_(1, destination.clamp(min=0), sources)
    return mixed | (carried > 0)
