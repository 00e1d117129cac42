"""EViT token reorganization: keep the most attended tokens, fuse the rest into one."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def kept_token_count(num_tokens: int, keep_rate: float) -> int:
    """Number of image tokens kept: ``ceil(keep_rate * num_tokens)``.

    The product is rounded to 6 decimals first so that float noise such as
    ``0.7 * 100 = 70.00000000000001`` does not keep one token more than the formula.
    """
    num_tokens = int(num_tokens)  # a tensor while torch.jit traces (fvcore)
    return min(num_tokens, math.ceil(round(keep_rate * num_tokens, 6)))


def reorganize_tokens(
    x: Tensor, scores: Tensor, num_prefix_tokens: int, keep_rate: float, fuse: bool = True
) -> tuple[Tensor, Tensor]:
    """Keep the top-scored image tokens and (optionally) fuse the others into one token.

    Args:
        x: tokens ``(B, P + n, C)``; the first ``P = num_prefix_tokens`` are never touched.
        scores: attentiveness of each image token ``(B, n)`` (class attention averaged
            over heads). The fused token is the sum of the unkept tokens weighted by
            these raw scores, as in the paper (no renormalization).
        keep_rate: fraction in (0, 1]; ``ceil(keep_rate * n)`` tokens are kept.
        fuse: append the fused token (EViT) or drop the unkept tokens (EViT w/o fusion).

    Returns:
        ``[prefix, kept (highest score first), fused]`` and the kept tokens' indices
        ``(B, k)`` into the incoming image tokens. When every token is kept, ``x`` is
        returned unchanged with the identity index.
    """
    batch, total, channels = x.shape
    num_image = total - num_prefix_tokens
    keep = kept_token_count(num_image, keep_rate)
    if keep >= num_image:
        return x, torch.arange(num_image, device=x.device).expand(batch, num_image)

    prefix, image = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    kept_index = scores.topk(keep, dim=1).indices
    kept = image.gather(1, kept_index.unsqueeze(-1).expand(-1, -1, channels))
    parts = [prefix, kept]
    if fuse:
        unkept_weights = scores.scatter(1, kept_index, 0.0).to(image.dtype)
        parts.append(torch.bmm(unkept_weights.unsqueeze(1), image))
    return torch.cat(parts, dim=1), kept_index
