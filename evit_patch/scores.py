"""Token attentiveness scores from what an attention layer hands out.

The rewritten attention returns :data:`AttentionTensors` beside its output; scores are
computed from them only when a layer actually drops tokens. With fused attention
(``F.scaled_dot_product_attention``) the attention matrix never exists, so the class
token's row is recomputed from ``q`` and ``k``: one query against N keys, O(N d).
"""

from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch
from torch import Tensor

ScoreMode = Literal["class", "mean"]
"""``class``: the class token's attention row (the paper). ``mean``: for models
without a class token, the attention each token receives averaged over all queries,
i.e. its weight in the average of the attention outputs that global pooling reads."""


AttentionTensors = Tuple[Optional[Tensor], Optional[Tensor], Optional[float], Optional[Tensor]]
"""``(q, k, scale, None)`` from fused attention, ``(None, k, None, attention)`` from
attention that materializes its post-softmax matrix (``k`` None where the graph does not
show it)."""


def token_scores(tensors: AttentionTensors, mode: ScoreMode, num_prefix_tokens: int) -> Tensor:
    """One score per image token ``(B, n)`` from an attention layer's tensors."""
    q, k, scale, attention = tensors
    if attention is not None:
        return scores_from_attention(attention, mode, num_prefix_tokens)
    return scores_from_qk(q, k, scale, mode, num_prefix_tokens)


def _head_mean(attention: Tensor, mode: ScoreMode, num_prefix_tokens: int) -> Tensor:
    """Reduce post-softmax attention ``(B, H, Nq, N)`` to one score per image token."""
    if mode == "class":
        rows = attention[:, :, 0]
    else:
        rows = attention.mean(dim=2)
    return rows.mean(dim=1)[:, num_prefix_tokens:]


def scores_from_qk(
    q: Tensor, k: Tensor, scale: Optional[float], mode: ScoreMode, num_prefix_tokens: int
) -> Tensor:
    """Scores from queries and keys ``(B, H, N, d)``; softmax in at least float32."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    queries = q[:, :, :1] if mode == "class" else q
    precision = torch.promote_types(q.dtype, torch.float32)
    logits = (queries.to(precision) @ k.to(precision).transpose(-2, -1)) * scale
    return _head_mean(logits.softmax(dim=-1), mode, num_prefix_tokens).to(q.dtype)


def scores_from_attention(attention: Tensor, mode: ScoreMode, num_prefix_tokens: int) -> Tensor:
    """Scores from an explicit post-softmax attention matrix (non-fused attention)."""
    return _head_mean(attention, mode, num_prefix_tokens)


def active_dropout_rate(dropout: torch.nn.Module) -> float:
    """Attention dropout probability in the module's current train/eval mode."""
    return dropout.p if dropout.training else 0.0
