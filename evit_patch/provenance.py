"""Which input patches each reorganization layer kept, fused or dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from evit_patch.patch import evit_state

KEPT, FUSED, DROPPED = 0, 1, 2


@dataclass(frozen=True)
class LayerTokens:
    """Token provenance after one reorganization layer (batch-first tensors).

    Attributes:
        block_index: the block that reorganized.
        kept_index: ``(B, k)`` indices of the kept tokens among the image tokens entering
            this layer, highest score first.
        token_of_patch: ``(B, num_patches)`` position, among this layer's output image
            tokens, of the token that holds each input patch; -1 where it was dropped.
        status: ``(B, num_patches)`` KEPT (the patch is still its own token), FUSED
            (inside a fused token) or DROPPED (discarded without fusion).
    """

    block_index: int
    kept_index: Tensor
    token_of_patch: Tensor
    status: Tensor


def kept_tokens(model: nn.Module) -> list[LayerTokens]:
    """Provenance of the last forward of a patched model, one entry per layer."""
    state = evit_state(model)
    if any(index is None for index in state.kept_indices):
        raise RuntimeError("no token record yet: run a forward pass through the patched model first")
    first = state.kept_indices[0]
    batch, num_patches = first.shape[0], state.incoming_counts[0]
    token_of_patch = torch.arange(num_patches, device=first.device).expand(batch, num_patches)
    token_is_fused = torch.zeros(batch, num_patches, dtype=torch.bool, device=first.device)
    layers = []
    for block_index, kept_index, incoming in zip(state.layers, state.kept_indices, state.incoming_counts):
        keep = kept_index.shape[1]
        has_fused_token = state.fuse and keep < incoming
        destination = torch.full((batch, incoming), keep if has_fused_token else -1, device=first.device)
        destination.scatter_(1, kept_index, torch.arange(keep, device=first.device).expand(batch, keep))
        token_is_fused = token_is_fused.gather(1, kept_index)
        if has_fused_token:
            token_is_fused = torch.cat([token_is_fused, token_is_fused.new_ones(batch, 1)], dim=1)
        alive = token_of_patch >= 0
        token_of_patch = torch.where(alive, destination.gather(1, token_of_patch.clamp(min=0)), -1)
        alive = token_of_patch >= 0
        in_fused = token_is_fused.gather(1, token_of_patch.clamp(min=0)) & alive
        status = torch.full_like(token_of_patch, KEPT)
        status[in_fused] = FUSED
        status[~alive] = DROPPED
        layers.append(LayerTokens(block_index, kept_index, token_of_patch, status))
    return layers
