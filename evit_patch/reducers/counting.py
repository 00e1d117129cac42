"""How many image tokens a reducing layer leaves: the one count every reducer shares."""

from __future__ import annotations

import math


def kept_token_count(num_tokens: int, keep_rate: float) -> int:
    """Number of image tokens kept: ``ceil(keep_rate * num_tokens)`` of the float product,
    exactly as the official EViT code counts (``math.ceil(keep_rate * (N - 1))``), so a
    patched model keeps the same tokens at every size (e.g. ``0.55 * 180`` is
    ``99.00000000000001`` in floats: 100 kept, as there). Any keep rate in (0, 1] keeps at
    least one token of a non-empty sequence, since the product is then positive.
    """
    num_tokens = int(num_tokens)  # a tensor while torch.jit traces (fvcore)
    return min(num_tokens, math.ceil(keep_rate * num_tokens))


def merged_token_count(num_tokens: int, keep_rate: float) -> int:
    """Image tokens after merging: EViT's kept tokens plus its fused one."""
    return min(num_tokens, kept_token_count(num_tokens, keep_rate) + 1)
