"""An independent eager ToMe forward for timm ViTs, for comparison with ``ToMeMerge``.

Written from the Token Merging paper (Bolya et al., ICLR 2023): between a block's
attention and its MLP, the image tokens alternate into sets A (even positions) and B
(odd); each A token's partner is the B token whose key (averaged over heads) has the
highest cosine similarity with its own; the ``r`` A tokens with the most similar
partners are averaged into them, weighted by the patches each token holds; sizes are
carried, and proportional attention adds ``log(size)`` to the attention logits of every
attention after the first merge. Prefix tokens are never merged. The output is
``[prefix, unmerged A (most similar partner first), B]``.

It runs at the product's insertion point and counts (a layer that EViT leaves with
``ceil(r n) + 1`` image tokens is merged down to as many) but shares no code with it:
every block is re-derived sample by sample with explicit matrices and Python loops.
Only the patch/position embedding, the MLP, the attention's (identity) q/k/output norms
and the head are the model's own modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Similarity = Literal["cosine", "dot"]
HeadReduce = Literal["mean", "max"]


def merged_count(num_tokens: int, keep_rate: float) -> int:
    """Image tokens left after a merging layer: EViT's ``ceil(r n)`` kept plus its fused one."""
    return min(num_tokens, math.ceil(Fraction(str(keep_rate)) * num_tokens) + 1)


@dataclass
class SampleMerge:
    """What one merging layer did to one sample's image tokens.

    ``kept_index``: for each output image token, the incoming token that represents it
    (an unmerged A token, or the B token the merges went into). ``destination``: for each
    incoming image token, the output image token holding it. ``sizes``: patches held by
    each output image token. ``margin``: the smallest gap between two similarities this
    layer's decisions compared (partner choice and the order of A tokens); a gap below
    float32 resolution would make the merge a matter of rounding.
    """

    kept_index: list[int]
    destination: list[int]
    sizes: list[float]
    margin: float


def _similarities(metric: Tensor, set_a: list[int], set_b: list[int], kind: Similarity) -> list[list[float]]:
    """``[i][j]``: similarity of A token ``set_a[i]`` to B token ``set_b[j]``; cosine divides
    the dot product by both vectors' Euclidean lengths."""
    a, b = metric[set_a], metric[set_b]
    dots = a @ b.T
    if kind == "cosine":
        dots = dots / ((a * a).sum(dim=1).sqrt()[:, None] * (b * b).sum(dim=1).sqrt()[None, :])
    return dots.tolist()


def merge_sample(tokens: Tensor, metric: Tensor, sizes: list[float], num_merged: int,
                 similarity: Similarity = "cosine") -> tuple[Tensor, SampleMerge]:
    """Bipartite soft matching of one sample's image tokens ``(n, C)`` by ``metric`` ``(n, d)``."""
    count = tokens.shape[0]
    set_a, set_b = list(range(0, count, 2)), list(range(1, count, 2))
    best, partner, margins = [], [], []
    for row in _similarities(metric, set_a, set_b, similarity):
        ranked = sorted(range(len(set_b)), key=lambda t: -row[t])
        best.append(row[ranked[0]])
        partner.append(ranked[0])
        if len(ranked) > 1:
            margins.append(row[ranked[0]] - row[ranked[1]])
    order = sorted(range(len(set_a)), key=lambda t: -best[t])
    margins += [best[order[t]] - best[order[t + 1]] for t in range(len(order) - 1)]
    merged, unmerged = order[:num_merged], order[num_merged:]

    sums = [sizes[j] * tokens[j] for j in set_b]
    b_sizes = [sizes[j] for j in set_b]
    for t in merged:
        target = partner[t]
        sums[target] = sums[target] + sizes[set_a[t]] * tokens[set_a[t]]
        b_sizes[target] += sizes[set_a[t]]
    out = [tokens[set_a[t]] for t in unmerged] + [sums[j] / b_sizes[j] for j in range(len(set_b))]

    destination = [0] * count
    for position, t in enumerate(unmerged):
        destination[set_a[t]] = position
    for t in merged:
        destination[set_a[t]] = len(unmerged) + partner[t]
    for position, j in enumerate(set_b):
        destination[j] = len(unmerged) + position
    record = SampleMerge(
        kept_index=[set_a[t] for t in unmerged] + set_b,
        destination=destination,
        sizes=[sizes[set_a[t]] for t in unmerged] + b_sizes,
        margin=min(margins, default=math.inf),
    )
    return torch.stack(out), record


def _attention_sample(h: Tensor, attn: nn.Module, key_weights: Optional[list[float]]) -> tuple[Tensor, Tensor]:
    """One sample's attention ``(N, C) -> (N, C)`` with an explicit softmax, and its keys ``(H, N, d)``.

    ``key_weights``: each key's weight ``w_j`` (proportional attention), added to the
    logits as ``log w_j``.
    """
    tokens, channels = h.shape
    heads = attn.num_heads
    qkv = h @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)
    q, k, v = qkv.reshape(tokens, 3, heads, channels // heads).permute(1, 2, 0, 3)
    q, k = attn.q_norm(q), attn.k_norm(k)
    head_dim = q.shape[-1]
    outputs = []
    for head in range(heads):
        logits = q[head] @ k[head].T / math.sqrt(head_dim)
        if key_weights is not None:
            logits = logits + torch.tensor([math.log(w) for w in key_weights], dtype=logits.dtype)[None, :]
        exponentials = (logits - logits.max(dim=1, keepdim=True).values).exp()
        outputs.append(exponentials / exponentials.sum(dim=1, keepdim=True) @ v[head])
    out = attn.norm(torch.cat(outputs, dim=1))
    return out @ attn.proj.weight.T + attn.proj.bias, k


def _layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _layer_scale(x: Tensor, scale: nn.Module) -> Tensor:
    return x * scale.gamma if hasattr(scale, "gamma") else x


def _head_reduce(keys: Tensor, kind: HeadReduce) -> Tensor:
    """Keys ``(H, N, d)`` to one metric vector per token ``(N, d)``."""
    if kind == "mean":
        return sum(keys[head] for head in range(keys.shape[0])) / keys.shape[0]
    return keys.max(dim=0).values


def tome_forward(model: nn.Module, images: Tensor, layers: list[int], keep_rate: float,
                 proportional: bool = True, similarity: Similarity = "cosine",
                 head_reduce: HeadReduce = "mean") -> tuple[Tensor, list[list[SampleMerge]]]:
    """Logits of ``model`` with ToMe merging at ``layers``, and per merging layer the
    :class:`SampleMerge` of each sample (only layers that merge at least one token).

    ``similarity`` and ``head_reduce`` select wrong variants (raw dot product, head max)
    so that a test can show they change the merges.
    """
    with torch.no_grad():
        return _tome_forward(model, images, layers, keep_rate, proportional, similarity, head_reduce)


def _tome_forward(model: nn.Module, images: Tensor, layers: list[int], keep_rate: float, proportional: bool,
                  similarity: Similarity, head_reduce: HeadReduce) -> tuple[Tensor, list[list[SampleMerge]]]:
    prefix = model.num_prefix_tokens
    embedded = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    logits, records = [], [[] for _ in layers]
    for sample in range(images.shape[0]):
        x = embedded[sample]
        sizes: Optional[list[float]] = None
        for index, block in enumerate(model.blocks):
            key_weights = [1.0] * prefix + sizes if (proportional and sizes is not None) else None
            out, keys = _attention_sample(_layer_norm(x, block.norm1), block.attn, key_weights)
            x = x + _layer_scale(out, block.ls1)
            if index in layers:
                count = x.shape[0] - prefix
                num_merged = count - merged_count(count, keep_rate)
                if num_merged > 0:
                    metric = _head_reduce(keys, head_reduce)[prefix:]
                    merged, record = merge_sample(x[prefix:], metric, sizes or [1.0] * count, num_merged,
                                                  similarity)
                    x = torch.cat([x[:prefix], merged])
                    sizes = record.sizes
                    records[layers.index(index)].append(record)
            x = x + _layer_scale(block.mlp(_layer_norm(x, block.norm2)), block.ls2)
        logits.append(model.forward_head(model.norm(x.unsqueeze(0)))[0])
    return torch.stack(logits), [layer for layer in records if layer]


def token_of_patch(records: list[list[SampleMerge]], num_patches: int) -> list[list[list[int]]]:
    """For each merging layer and sample, the output image token holding each input patch."""
    result = []
    current = [list(range(num_patches)) for _ in records[0]] if records else []
    for layer in records:
        current = [[merge.destination[token] for token in held] for held, merge in zip(current, layer)]
        result.append(current)
    return result
