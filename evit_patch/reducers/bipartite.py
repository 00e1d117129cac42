"""ToMe's bipartite soft matching: which tokens merge into which, as output slots."""

from __future__ import annotations

import torch
from torch import Tensor

from evit_patch.core.scores import as_dtype, at_least_float32, without_autocast


def bipartite_destinations(metric: Tensor, num_merged: int) -> tuple[Tensor, Tensor]:
    """ToMe's bipartite soft matching: where each of the ``n`` tokens goes when
    ``num_merged`` of them are merged.

    Args:
        metric: ``(B, n, d)`` features whose cosine similarity picks the partners.
        num_merged: at most the size of set A, ``ceil(n / 2)``.

    Returns:
        ``kept_index`` ``(B, n - num_merged)``, the token each output stands for (the
        unmerged A tokens, then every B token), and ``destination`` ``(B, n)``, the
        output slot of each incoming token.
    """
    return _matching(metric, num_merged)[:2]


def bipartite_matching(metric: Tensor, num_merged: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`bipartite_destinations`, and the cosine of each merged A token with its
    partner ``(B, num_merged)``, most similar first (what the merge costs)."""
    kept_index, destination, best, order = _matching(metric, num_merged)
    return kept_index, destination, best.gather(1, order[:, :num_merged])


def _matching(metric: Tensor, num_merged: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``kept_index``, ``destination``, each A token's best cosine ``(B, ceil(n / 2))`` and the
    A tokens from most to least similar; the similarities only for who asks for them (at
    batch 1 each operation is a measurable part of a layer)."""
    batch, count, _ = metric.shape
    count_a, count_b = (count + 1) // 2, count // 2
    if num_merged > count_a:
        raise ValueError(f"bipartite matching merges at most {count_a} of {count} tokens per layer "
                         f"(half, rounded up), asked for {num_merged}: raise the keep rate to at least 0.5")
    with without_autocast(metric.device):  # similarities decide the merges: in at least float32
        metric = as_dtype(metric, at_least_float32(metric.dtype))
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize without its expand_as
        best, partner = (metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)).max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    unmerged_a = order[:, num_merged:]
    num_unmerged = count_a - num_merged
    # every A token goes to its partner's slot behind the unmerged ones, unless it stays itself
    destination_a = (partner + num_unmerged).scatter_(1, unmerged_a,
                                                      torch.arange(num_unmerged, device=metric.device).expand(batch, -1))
    destination = torch.empty(batch, count, dtype=torch.long, device=metric.device)
    destination[:, 0::2] = destination_a
    destination[:, 1::2] = torch.arange(num_unmerged, num_unmerged + count_b, device=metric.device)
    b_index = torch.arange(1, count, 2, device=metric.device).expand(batch, -1)
    return torch.cat([unmerged_a * 2, b_index], dim=1), destination, best, order
