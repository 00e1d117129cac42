"""Token attentiveness scores from what an attention layer hands out.

The rewritten attention returns :data:`AttentionTensors` beside its output; scores are
computed from them only when a layer actually drops tokens. With fused attention
(``F.scaled_dot_product_attention``) the attention matrix never exists, so the class
token's row is recomputed from ``q`` and ``k``: one query against N keys, O(N d).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Literal, NamedTuple, Optional

import torch
from torch import Tensor

ScoreMode = Literal["class", "mean"]
"""``class``: the class token's attention row (the paper). ``mean``: for models
without a class token, the attention each token receives averaged over all queries,
i.e. its weight in the average of the attention outputs that global pooling reads."""


class AttentionTensors(NamedTuple):
    """What an attention layer hands a reducer beside its output: ``(query, keys, scale, None, bias)``
    from fused attention, ``(None, keys, None, weights)`` from attention that materializes its
    post-softmax matrix. A tuple still; a 4-tuple ``(q, k, scale, weights)`` reads as one without bias.

    Attributes:
        query: ``(B, H, N, d)`` (or the class token's alone, ``(B, H, 1, d)``); None with ``weights``.
        keys: ``(B, H, N, d)``; None where the graph does not show them.
        scale: the softmax scale the fused call was given (None: ``d ** -0.5``).
        weights: ``(B, H, N, N)`` post-softmax attention; None with fused attention.
        bias: the ``attn_mask`` the fused call was given (a relative position bias), added to the logits.
    """

    query: Optional[Tensor]
    keys: Optional[Tensor]
    scale: Optional[float]
    weights: Optional[Tensor]
    bias: Optional[Tensor] = None


def token_scores(tensors: AttentionTensors, mode: ScoreMode, num_prefix_tokens: int) -> Tensor:
    """One score per image token ``(B, n)`` from an attention layer's tensors.

    Scores are in at least float32 whatever the activations' dtype: under bf16/fp16
    autocast many tokens would share a rounded score, and the top-k at the cut would be
    decided by rounding (the reference code's softmax output is float32 under AMP too).
    """
    tensors = AttentionTensors(*tensors)  # a plain 4-tuple, as callers of a reducer gave before, reads the same
    if tensors.weights is not None:
        return scores_from_attention(tensors.weights, mode, num_prefix_tokens)
    return scores_from_qk(tensors.query, tensors.keys, tensors.scale, mode, num_prefix_tokens, tensors.bias)


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A region where autocast does not run matmuls in bf16/fp16 (nothing to turn off
    where autocast is off, or on devices without it, such as ``meta``)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@functools.cache
def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """``dtype``, but at least float32: where scores, shares and sums are taken. Cached:
    ``torch.promote_types`` is a dispatched operator, and at batch 1 every one counts."""
    return torch.promote_types(dtype, torch.float32)


def as_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` in ``dtype``, without dispatching a cast when it already is: at batch 1 a
    reorganization layer is a few dozen such operations (docs/measured.md, "Choices in the code")."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _head_mean(attention: Tensor, mode: ScoreMode, num_prefix_tokens: int) -> Tensor:
    """Reduce post-softmax attention ``(B, H, Nq, N)`` to one score per image token: the
    class token's row (``Nq`` may be that row alone) or all rows, averaged with the heads
    in one reduction that accumulates in :func:`at_least_float32` (no upcast copy first)."""
    rows = attention[:, :, :1] if mode == "class" else attention
    return rows.mean(dim=(1, 2), dtype=at_least_float32(attention.dtype))[:, num_prefix_tokens:]


def scores_from_qk(
    q: Tensor, k: Tensor, scale: Optional[float], mode: ScoreMode, num_prefix_tokens: int,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """Scores from queries and keys ``(B, H, N, d)``: logits, softmax and scores in at
    least float32, whatever the dtype of ``q`` and ``k``. ``bias``: what the attention adds to its
    logits (``(1 or B, H, N, N)``, float; a boolean one masks the keys it marks False)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    queries = q[:, :, :1] if mode == "class" else q
    precision = at_least_float32(q.dtype)
    # One dense copy of k: a strided k (a view into the packed qkv projection) sends
    # matmul down a path several times slower than the copy and a batched product.
    keys = k.to(precision).contiguous()
    with without_autocast(q.device):
        logits = (queries.to(precision) * scale) @ keys.transpose(-2, -1)  # scaled on the smaller side
        if bias is not None:
            rows = bias[..., :1, :] if mode == "class" else bias
            logits = logits.masked_fill(~rows, float("-inf")) if rows.dtype == torch.bool else logits + rows.to(precision)
        return _head_mean(logits.softmax(dim=-1), mode, num_prefix_tokens)


def scores_from_attention(attention: Tensor, mode: ScoreMode, num_prefix_tokens: int) -> Tensor:
    """Scores from an explicit post-softmax attention matrix (non-fused attention), in at
    least float32 (the matrix itself is what the model computed: float32 from CUDA
    autocast's softmax, bf16 from CPU autocast's)."""
    return _head_mean(attention, mode, num_prefix_tokens)


def active_dropout_rate(dropout: torch.nn.Module) -> float:
    """Attention dropout probability in the module's current train/eval mode."""
    return dropout.p if dropout.training else 0.0
