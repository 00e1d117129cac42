"""Random drop: the control that tells whether *which* tokens EViT keeps matters."""

from __future__ import annotations

import torch
from torch import Tensor

from evit_patch.core.reduction import LayerContext, Reduction, TokenReducer, identity_reduction, selection_reduction
from evit_patch.core.scores import AttentionTensors
from evit_patch.reducers.evit import kept_token_count


def random_kept_index(batch: int, num_tokens: int, keep: int, generator: torch.Generator) -> Tensor:
    """``(B, keep)`` distinct token indices per sample, uniformly at random."""
    return torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)[:, :keep]


class RandomDrop(TokenReducer):
    """Keep ``ceil(keep_rate * n)`` image tokens chosen uniformly at random, drop the rest.

    The same counts as EViT without fusion, with no look at the tokens. Its own seeded
    generator (drawn on the CPU) makes a run reproducible whatever else uses the global
    random state; each forward draws afresh.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.name = f"random(seed={seed})"

    def reduce(self, x: Tensor, attention: AttentionTensors, context: LayerContext) -> Reduction:
        num_image = x.shape[1] - context.num_prefix_tokens
        keep = kept_token_count(num_image, context.keep_rate)
        if keep >= num_image:
            return identity_reduction(x, context.num_prefix_tokens)
        kept_index = random_kept_index(x.shape[0], num_image, keep, self.generator).to(x.device)
        return selection_reduction(x, context.num_prefix_tokens, kept_index, None)
