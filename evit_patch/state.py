"""Runtime state shared by the reorganization layers of one patched model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from evit_patch.reducers.evit import kept_token_count, reorganize_tokens
from evit_patch.scores import AttentionTensors, ScoreMode, token_scores


@dataclass(eq=False)
class EvitState:
    """What every reorganization layer of a model reads and writes.

    One object per patched model (not globals), so two patched models, or a model
    and its EMA copy, never see each other's keep rate.
    """

    layers: list[int]
    keep_rates: list[float]
    fuse: bool
    num_prefix_tokens: int
    score_mode: ScoreMode
    original_blocks: dict[int, nn.Module] = field(default_factory=dict)
    kept_indices: list[Optional[Tensor]] = field(default_factory=list)
    incoming_counts: list[Optional[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.clear_record()

    def clear_record(self) -> None:
        self.kept_indices = [None] * len(self.layers)
        self.incoming_counts = [None] * len(self.layers)


class TokenReorganizer(nn.Module):
    """The module inserted between a block's attention residual and its MLP.

    It holds no parameter or buffer; it reads its keep rate from the shared state and
    records which tokens it kept, for :func:`evit_patch.kept_tokens`.
    """

    def __init__(self, state: EvitState, position: int) -> None:
        super().__init__()
        self.state = state
        self.position = position

    def forward(self, x: Tensor, attention: AttentionTensors, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(
                "an EViT-patched block shortens the token sequence, so attn_mask / is_causal "
                "cannot be applied; call the model without them, or remove_evit(model) first"
            )
        state = self.state
        num_image = x.shape[1] - state.num_prefix_tokens
        keep_rate = state.keep_rates[self.position]
        state.incoming_counts[self.position] = num_image
        if kept_token_count(num_image, keep_rate) >= num_image:  # nothing to drop: skip the scores
            state.kept_indices[self.position] = torch.arange(num_image, device=x.device).expand(x.shape[0], -1)
            return x
        scores = token_scores(attention, state.score_mode, state.num_prefix_tokens)
        reorganized, state.kept_indices[self.position] = reorganize_tokens(
            x, scores, state.num_prefix_tokens, keep_rate, state.fuse
        )
        return reorganized

    def extra_repr(self) -> str:
        return f"block={self.state.layers[self.position]}, keep_rate={self.state.keep_rates[self.position]}, fuse={self.state.fuse}"
